"""The documentation is checked like code: the site builds with `mkdocs build --strict`, the
reference pages are what spec/reference.py renders from the models today, and every code block
of the README is run or checked against the real thing.

README blocks, by their fence's language:
- bash: one command per line (`\\` continues it, `#` comments, `A=b` prefixes allowed): `make T`
  (T a target of the Makefile, `V=x` a variable of it), `mergeserve ...` (parsed by the CLI's
  own argparse parser, not run), `curl` against http://127.0.0.1:8000 (sent to a live server,
  which must answer 2xx; a composition it PUTs must parse with its sources, relative to examples/
  as under `make demo`, existing, and then build, over tiny weights).
- yaml: a composition spec (or a serve config), loaded by mergeserve's loader; its sources
  relative to the repository or to examples/, and all of them must exist.
- python: an `openai` client program against http://127.0.0.1:8000/v1, run.
- mermaid, text: not run.
A block in another language, or a command none of these checks, fails: a new kind of block needs
a check here first.

The live server stands in for `make demo`: examples/demo.yaml's compositions under their own
names, with tiny random LoRA experts (tests/tiny.py) in place of SmolLM2's, and an admin key.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from live import Gateway, built, live_gateway
from mergeserve.cli import parser
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.spec import EngineConfig, load_composition, load_serve_config, parse_composition
from mergeserve.spec.composition import PATH_FIELDS
from mergeserve.spec.reference import PAGES, REGENERATE, render

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO = ROOT / "examples" / "demo.yaml"
ADMIN_KEY = "docs-admin-key"
DEMO_URLS = ("http://127.0.0.1:8000", "http://localhost:8000", "127.0.0.1:8000", "localhost:8000")
NOT_RUN = ("mermaid", "text")


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # of the opening fence, 1-based

    def __str__(self) -> str:
        return f"README.md:{self.line} ```{self.lang}"


def fenced_blocks(text: str) -> list[Block]:
    """Every fenced code block of a Markdown text (``` fences, indented ones included)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^( *)(`{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, start = len(opening[1]), opening[2], i
        body = []
        i += 1
        while i < len(lines) and not re.match(rf"^ *{fence}\s*$", lines[i]):
            body.append(lines[i][indent:] if not lines[i][:indent].strip() else lines[i].lstrip())
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: a code block that is never closed"
        blocks.append(Block(opening[3].lower(), "\n".join(body), start + 1))
        i += 1
    return blocks


BLOCKS = fenced_blocks(README.read_text()) if README.is_file() else []


# -- the site and the reference pages -------------------------------------------------------------

def test_the_site_builds_with_mkdocs_strict(tmp_path: Path):
    pytest.importorskip("mkdocs", reason="mkdocs is in the docs extra: pip install -e '.[docs]'")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "reference" / "spec" / "index.html").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.page_file)
def test_the_reference_pages_are_what_the_models_render_today(page):
    assert (ROOT / page.page_file).read_text() == render(page), f"regenerate them: {REGENERATE}"


# -- the README's code blocks -----------------------------------------------------------------------

def test_the_readme_has_code_blocks_to_check():
    assert BLOCKS, "README.md: no code blocks found"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_each_readme_block_runs_or_is_checked(block: Block, request: pytest.FixtureRequest):
    check_block(block, request)


def check_block(block: Block, request: pytest.FixtureRequest) -> None:
    if block.lang in NOT_RUN:
        return
    check = {"bash": check_shell, "yaml": check_yaml, "python": run_python}.get(block.lang)
    assert check is not None, f"{block}: no check for blocks in {block.lang!r} (only bash, yaml, python; {', '.join(NOT_RUN)} are not run)"
    check(block, request)


def check_shell(block: Block, request: pytest.FixtureRequest) -> None:
    targets, variables = makefile()
    built_here: list[str] = []
    for words in shell_commands(block):
        program = Path(words[0]).name
        if program == "make":
            for word in words[1:]:
                if "=" in word:
                    assert word.split("=")[0] in variables, f"{block}: {word}: not a variable of the Makefile"
                else:
                    assert not word.startswith("-") and word in targets, f"{block}: make {word}: not a target of the Makefile"
        elif program == "mergeserve":
            try:
                parser().parse_args(words[1:])
            except SystemExit as e:
                pytest.fail(f"{block}: {shlex.join(words)}: the CLI refuses it (exit {e.code})")
        elif program == "curl":
            built_here += run_curl(block, words, request.getfixturevalue("demo_server"))
        else:
            pytest.fail(f"{block}: {shlex.join(words)}: a command this test cannot check (make, mergeserve or curl)")
    for name in built_here:  # a composition the block PUT builds and serves (its sources the tiny ones)
        status = request.getfixturevalue("demo_server").settled(name)
        assert status["state"] == "ready", f"{block}: {name} did not build: {status['error']}"


def shell_commands(block: Block) -> Iterator[list[str]]:
    """Each command of a shell block as words: lines joined at a trailing `\\` or an open quote,
    comments dropped, `A=b` prefixes dropped, `&&` and `;` separating commands. A pipe or
    redirection is a command this test cannot check."""
    pending = ""
    for line in block.body.splitlines():
        pending += line + "\n"
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on
            continue
        pending = ""
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            else:
                assert word not in ("|", "||", ">", ">>", "<", "&"), f"{block}: {shlex.join(words)}: pipes and redirections cannot be checked"
                command.append(word)
    assert not pending.strip(), f"{block}: an unterminated command: {pending!r}"


def makefile() -> tuple[set[str], set[str]]:
    """The Makefile's targets and variables."""
    text = (ROOT / "Makefile").read_text()
    targets = {t for m in re.finditer(r"^([A-Za-z0-9_.$()/ -]+?)\s*:(?!=)", text, re.M) for t in m[1].split()}
    variables = set(re.findall(r"^([A-Za-z_][A-Za-z0-9_]*)\s*[?:+]?=", text, re.M))
    return targets, variables


def run_curl(block: Block, words: list[str], server: DemoServer) -> list[str]:
    """A curl command sent with httpx to the live server: its method, path, headers and JSON body.
    Returns the name of the composition it PUT, if it did."""
    method, headers, body, url = None, {}, None, None
    args = iter(words[1:])
    for word in args:
        if word in ("-X", "--request"):
            method = next(args)
        elif word in ("-H", "--header"):
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif word in ("-d", "--data", "--data-raw", "--json"):
            body = next(args)
            assert not body.startswith("@"), f"{block}: curl -d {body}: a body read from a file cannot be checked; show it inline"
        elif re.fullmatch(r"-[sSfNiv]+|--(silent|show-error|fail|no-buffer|include|verbose)", word):
            continue
        elif word.startswith("-"):
            pytest.fail(f"{block}: curl {word}: an option this test does not know")
        else:
            assert url is None, f"{block}: curl with two URLs"
            url = word
    assert url and url.startswith(DEMO_URLS), f"{block}: curl {url}: not a URL of the demo server (http://127.0.0.1:8000)"
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if "Authorization" in headers:  # $ADMIN, $MERGESERVE_ADMIN_KEY: the key the server was given
        headers["Authorization"] = f"Bearer {ADMIN_KEY}"
    if body is not None:
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            pytest.fail(f"{block}: curl -d {body[:60]!r}...: not JSON")
        if parts.path.startswith("/admin/compositions/"):
            check_sources(block, {"name": parts.path.rsplit("/", 1)[-1]} | data, DEMO.parent)  # the admin API's folder under make demo
            data = server.tiny_spec(data)
        body = json.dumps(data)
        headers.setdefault("Content-Type", "application/json")
    method = method or ("POST" if body is not None else "GET")
    response = server.http.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers, content=body)
    assert response.is_success, f"{block}: curl {method} {parts.path}: {response.status_code} {response.text[:500]}"
    return [parts.path.rsplit("/", 1)[-1]] if method == "PUT" and parts.path.startswith("/admin/compositions/") else []


def check_sources(block: Block, data: dict, folder: Path) -> None:
    """A spec sent to the admin API parses, and its sources, relative to `folder`, exist."""
    try:
        spec = parse_composition(data, folder, origin=str(block))
    except ValueError as e:
        pytest.fail(str(e))
    missing = [p for p in spec.source_paths if not Path(p).exists()]
    assert not missing, f"{block}: sources that do not exist (relative to {folder.relative_to(ROOT)}/): {missing}"


def check_yaml(block: Block, request: pytest.FixtureRequest) -> None:
    try:
        data = yaml.safe_load(block.body)
    except yaml.YAMLError as e:
        pytest.fail(f"{block}: not YAML: {e}")
    assert isinstance(data, dict), f"{block}: not a composition spec (a mapping)"
    tmp = request.getfixturevalue("tmp_path")
    errors = []
    for folder in (ROOT, ROOT / "examples"):  # where the README's relative sources may start
        path = tmp / f"{folder.name}.yaml"
        path.write_text(yaml.safe_dump(absolute(data, folder)))
        try:
            specs = load_serve_config(path).compositions if "compositions" in data else [load_composition(path)]
        except ValueError as e:
            errors.append(str(e))
            continue
        missing = [p for spec in specs for p in spec.source_paths if not Path(p).exists()]
        if not missing:
            return
        errors.append(f"relative to {folder.relative_to(ROOT.parent)}: missing sources {missing}")
    pytest.fail(f"{block}: " + "\n".join(errors))


def absolute(data: dict, folder: Path) -> dict:
    """A spec or serve config with its relative paths made absolute against `folder`."""
    def fix(path: object) -> object:
        return str(folder / path) if isinstance(path, str) and "://" not in path and not Path(path).is_absolute() else path

    if "compositions" in data:
        return data | {"compositions": [fix(c) if isinstance(c, str) else absolute(c, folder) for c in data["compositions"]]}
    data = data | {"base": fix(data.get("base"))} if "base" in data else dict(data)
    if isinstance(data.get("experts"), str):
        data["experts"] = fix(data["experts"])
    elif isinstance(data.get("experts"), list):
        data["experts"] = [e | {k: fix(e[k]) for k in ("source", "base") if k in e} if isinstance(e, dict) else e for e in data["experts"]]
    for section, key in PATH_FIELDS:
        if isinstance(data.get(section), dict) and key in data[section]:
            data[section] = data[section] | {key: fix(data[section][key])}
    return data


def run_python(block: Block, request: pytest.FixtureRequest) -> None:
    server = request.getfixturevalue("demo_server")
    code = block.body
    for url in DEMO_URLS[:2]:
        code = code.replace(url, server.url)
    assert server.url in code, f"{block}: no base_url of the demo server (http://127.0.0.1:8000/v1)"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(block), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own example
    assert out.getvalue().strip(), f"{block}: ran, but printed nothing"


# -- the live server ------------------------------------------------------------------------------

@dataclass(kw_only=True)
class DemoServer(Gateway):
    base: Path
    adapters: list[Path]

    def tiny_spec(self, spec: dict) -> dict:
        """A composition spec with its base and expert sources replaced by the tiny ones."""
        if not isinstance(spec, dict) or spec.get("backend", "local") != "local":
            return spec
        spec = spec | {"base": str(self.base)} if "base" in spec else dict(spec)
        if isinstance(spec.get("experts"), list):
            spec["experts"] = [{k: v for k, v in e.items() if k != "base"} | {"source": str(self.adapters[i % len(self.adapters)])}
                               for i, e in enumerate(spec["experts"])]
        return spec


@pytest.fixture(scope="module")
def demo_server(zoo: dict[str, Path], adapters: dict[str, Path]) -> Iterator[DemoServer]:
    """`make demo`'s compositions (examples/demo.yaml) under their own names, over tiny LoRA experts."""
    registry, executor = Registry(), Executor()
    builder = Builder(registry, ExpertPool(), executor, EngineConfig(max_num_seqs=4, max_model_len=256))
    tiny = list(adapters.values())
    for spec in load_serve_config(DEMO).compositions:
        experts = [e.model_copy(update={"source": str(adapters.get(e.name, tiny[i % len(tiny)])), "base": None})
                   for i, e in enumerate(spec.experts)]
        revision = built(builder, spec.model_copy(update={"base": str(zoo["base"]), "experts": experts, "dtype": None}))
        assert revision.state == "ready", revision.error
    with live_gateway(registry, executor, Auth(admin_key=ADMIN_KEY), builder, kind=DemoServer,
                      base=zoo["base"], adapters=tiny) as server:
        yield server
    builder.shutdown()


def test_the_block_checks_catch_what_they_cannot_run():
    """The checks themselves: a command none of them knows, a misspelt target or flag, a file body."""
    shell = Block("bash", "make demo PORT=8123 && OMP_NUM_THREADS=1 mergeserve spec-schema --serve \\\n  # comment\n", 1)
    assert list(shell_commands(shell)) == [["make", "demo", "PORT=8123"], ["mergeserve", "spec-schema", "--serve"]]
    targets, variables = makefile()
    assert {"demo", "test", "setup"} <= targets and {"PORT", "HOST"} <= variables
    with pytest.raises(pytest.fail.Exception, match="cannot check"):
        check_shell(Block("bash", "docker build .", 1), None)
    with pytest.raises(AssertionError, match="not a target"):
        check_shell(Block("bash", "make demoo", 1), None)
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_shell(Block("bash", "mergeserve serve --confg x.yaml", 1), None)
    with pytest.raises(AssertionError, match="pipes"):
        list(shell_commands(Block("bash", "curl -s http://127.0.0.1:8000/v1/models | jq", 1)))
    with pytest.raises(AssertionError, match="no check"):
        check_block(Block("sh", "ls", 1), None)
