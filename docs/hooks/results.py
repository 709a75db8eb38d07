"""mkdocs hook: serve the benchmark pictures of `benchmarks/results/` under `results/`.

mkdocs only publishes files inside `docs_dir`; the PNGs that the benchmark scripts write stay
where they are (next to their JSON), and this hook adds each one to the site as
`results/<path under benchmarks/results>`, so a page links `results/serving.png`.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for png in sorted(RESULTS.rglob("*.png")):
        uri = f"results/{png.relative_to(RESULTS).as_posix()}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files
