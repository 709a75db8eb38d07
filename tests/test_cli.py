"""The `mergeserve` command line: bad input is a message and exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mergeserve.cli import main, parser


def write_spec(path: Path, zoo: dict[str, Path]) -> Path:
    spec = {
        "name": "tiny-moe", "base": str(zoo["base"]), "router": {"kind": "random", "top_k": 2},
        "experts": [{"name": name, "source": str(zoo[name])} for name in ("code", "math")],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def test_serve_rejects_an_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"compositions": [{"name": "empty", "base": "base", "experts": []}]}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "experts" in capsys.readouterr().err


def test_serve_rejects_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "serve.yaml"
    spec = {"name": "ghost", "base": "nowhere", "router": {"kind": "random", "top_k": 1},
            "experts": [{"name": "only", "source": "nowhere"}]}
    config.write_text(yaml.safe_dump({"compositions": [spec]}))
    assert main(["serve", "--config", str(config)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--config", str(tmp_path / "serve.yaml"), "--port", "70000"])
    assert exit.value.code == 2


def test_export_writes_a_mixtral_checkpoint(zoo: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert main(["export", "--spec", str(write_spec(tmp_path / "spec.yaml", zoo)), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 2


def test_eval_takes_several_specs_after_one_flag_as_a_shell_glob_gives_them() -> None:
    args = parser().parse_args(["eval", "--spec", "a.yaml", "b.yaml", "--spec", "c.yaml", "--out", "out"])
    assert args.spec == [Path("a.yaml"), Path("b.yaml"), Path("c.yaml")]
