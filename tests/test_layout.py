"""The code's map holds (docs/architecture.md): the import rules between packages, an opening docstring in every
source file, files of a readable size, and no run-time import of the reference libraries."""

from __future__ import annotations

import ast
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "src" / "stable_diffusion"
BASE = {"models", "diffusion", "prompts", "prompt_editing", "inpaint", "styles", "hires", "upscalers", "outpainting"}
ALLOWED = {  # unit -> the units it may import at run time (docs/architecture.md, "Import rules")
    **{unit: set() for unit in BASE},
    "checkpoints": {"models"},
    "images": {"checkpoints", "models"},
    "embeddings": {"checkpoints", "models"},
    "lora": {"checkpoints", "models"},
    "annotators": {"checkpoints"},
    "control": {"annotators", "checkpoints", "inpaint", "models"},
    "request": {"diffusion", "inpaint", "lora", "checkpoints", "models", "styles", "hires", "upscalers", "outpainting",
                "control"},
    "infotext": {"diffusion", "checkpoints", "control"},
    "conditioning": {"models", "diffusion", "prompts", "prompt_editing", "embeddings", "checkpoints"},
    "offload": {"models", "checkpoints"},
    "backends": set(),
}
ALLOWED["generate"] = set().union(*ALLOWED.values(), ALLOWED) - {"generate"}
ALLOWED["pipeline"] = {"models", "checkpoints", "request", "generate", "offload", "backends"} | ALLOWED["generate"]
ALLOWED["xyz"] = {"images", "infotext", "request", "styles"}
ALLOWED["metrics"] = {"models", "checkpoints", "images"}
ALLOWED["shapes"] = {"images", "metrics", "checkpoints", "models", "control"}
ALLOWED["training"] = set(ALLOWED) - {"training"}
ALLOWED["server"] = set(ALLOWED) - {"server", "training", "shapes"}
ALLOWED["cli"] = set(ALLOWED)
REFERENCES = ("diffusers", "transformers", "torchmetrics", "torch_fidelity", "k_diffusion", "open_clip")


def _unit(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return parts[0]


def _runtime_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    annotation_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and getattr(node.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(node)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in annotation_only]


def _sources() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.stat().st_size)


def test_packages_import_only_what_the_map_allows():
    problems = []
    for path in _sources():
        unit = _unit(path)
        if unit == "__init__":
            continue
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                here = path.parent.relative_to(PACKAGE).parts
                base = here[: len(here) - (node.level - 1)]
                target = [*base, *(node.module.split(".") if node.module else [])]
                if not target or target[0] in (unit, "__init__"):  # within the unit, or __version__
                    continue
                if target[0] not in ALLOWED[unit]:
                    problems.append(f"{path.relative_to(ROOT)}: {unit} imports {target[0]}")
            else:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                problems += [f"{path.relative_to(ROOT)}: imports the oracle {n}" for n in names
                             if n.split(".")[0] in REFERENCES]
    assert not problems, "\n".join(problems)


def test_every_source_file_says_what_it_is_and_stays_readable():
    for path in _sources():
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(ROOT)} has no opening docstring"
        assert len(text.splitlines()) <= 400, f"{path.relative_to(ROOT)} is over 400 lines"


def test_the_map_names_files_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text[text.index("## Where each concept lives"):text.index("## Import rules")]
    for cell in {c.strip() for line in table.splitlines()[4:] for c in line.split("|")[2:3]}:
        for name in cell.replace(";", ",").split(","):
            name = name.strip().split(" ")[0]
            if name.endswith(".py"):
                assert (PACKAGE / name).is_file(), f"docs/architecture.md names {name}, which does not exist"
