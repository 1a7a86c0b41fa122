"""The layers stay apart (like kubeflow/pipelines-components' import check):

- components/ import only the standard library and kfp at module scope (the library is
  imported inside the component bodies, where the image provides it);
- pipelines/ compile on a machine without the training stack (no torch, timm, mlflow...);
- the library thaw/ never imports components/, pipelines/ or thawctl/.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "torchvision", "timm", "mlflow", "boto3", "botocore", "sklearn", "numpy",
         "PIL", "matplotlib", "safetensors")


def _imports(tree: ast.AST, module_scope_only: bool) -> list[tuple[int, str]]:
    nodes = tree.body if module_scope_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "components").glob("*.py")), ids=lambda p: p.name)
def test_components_import_only_stdlib_and_kfp_at_module_scope(path):
    allowed = set(sys.stdlib_module_names) | {"kfp", "components", "__future__"}
    bad = [(line, name) for line, name in _imports(ast.parse(path.read_text()), True)
           if name not in allowed]
    assert not bad, f"{path.name} imports {bad} at module scope"


@pytest.mark.parametrize("path", sorted((ROOT / "thaw").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_imports_the_layers_above_it(path):
    bad = [(line, name) for line, name in _imports(ast.parse(path.read_text()), False)
           if name in ("components", "pipelines", "thawctl")]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_pipelines_compile_without_the_training_stack(tmp_path):
    """Import with torch & co. made unimportable, then compile: what a CI job or a laptop
    without the training stack does."""
    script = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {HEAVY!r}:
            raise ImportError(f"blocked for this test: {{name}}")
sys.meta_path.insert(0, Block())
from pipelines.thaw_pipeline import compile_pipeline
compile_pipeline({str(tmp_path / "p.yaml")!r})
print("compiled")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "compiled" in done.stdout
    assert (tmp_path / "p.yaml").stat().st_size > 0
