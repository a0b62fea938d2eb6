"""Every python block of the documentation site runs somewhere in CI. Blocks marked `exec="1"` run when
`mkdocs build --strict` builds the site (.ci/run; a block that raises fails the build). The few that
cannot run there (they name checkpoints a reader has, or need a GPU) are listed in UNEXECUTED with the
test that runs them; a new unexecuted block fails `test_every_unexecuted_block_has_a_check` until it
gets one."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", flags=re.M | re.S)

#: (page, the first 60 characters of the block) -> the test that runs it.
UNEXECUTED = {
    ("guides/equivalence-testing.md", "import torch"):
        "tests/testing/test_testing_guide.py::test_python_examples_run (checkpoints built in a temp project)",
    ("guides/equivalence-testing.md", "from neox_lab.testing import Port, qkv_part"):
        "tests/testing/test_testing_guide.py::test_python_examples_run",
    ("guides/equivalence-testing.md", "# tests/test_my_port.py"):
        "tests/testing/test_testing_guide.py::test_pytest_example_passes_with_the_page_command",
    ("guides/equivalence-testing.md", "# my_port.py"):
        "tests/testing/test_testing_guide.py::test_bash_and_workflow_commands_run (the py: factory)",
    ("guides/placement.md", '# model = NeoXForCausalLM.from_pretrained("EleutherAI/gpt-ne'):
        "comments only: test_comment_only_blocks_are_comments",
    ("guides/gpu.md", "import torch"):
        "test_gpu_page_snippet_runs_on_cpu and test_gpu_page_snippet_runs (gpu marker)",
}


def blocks(page: str | None = None, executed: bool | None = None) -> list[tuple[str, str]]:
    """(page, code) of the python blocks of one page or all of them."""
    pages = [DOCS / page] if page else sorted(p for p in DOCS.rglob("*.md")
                                              if not p.relative_to(DOCS).parts[0].startswith("_"))
    found = []
    for path in pages:
        for match in FENCE.finditer(path.read_text(encoding="utf-8")):
            is_exec = 'exec="1"' in match.group(1)
            if executed is None or is_exec == executed:
                found.append((str(path.relative_to(DOCS)), match.group(2)))
    return found


def first_line(code: str) -> str:
    return code.splitlines()[0][:60]


def test_every_unexecuted_block_has_a_check():
    found = {(page, first_line(code)) for page, code in blocks(executed=False)}
    assert found == set(UNEXECUTED), (
        f"python blocks the site build does not execute and no test runs: {sorted(found - set(UNEXECUTED))} "
        f"(mark them exec=\"1\" or add a test and an UNEXECUTED entry); "
        f"entries whose block is gone: {sorted(set(UNEXECUTED) - found)}")


def test_the_site_executes_blocks():
    # The build executes these; a page converted to plain blocks would silently stop being run.
    assert len(blocks(executed=True)) >= 40


def test_comment_only_blocks_are_comments():
    (code,) = [c for p, c in blocks("guides/placement.md", executed=False)]
    assert all(not line.strip() or line.lstrip().startswith("#") for line in code.splitlines())
    # Uncommented, the lines are valid Python (what a reader would run).
    compile("\n".join(line.replace("# ", "", 1) for line in code.splitlines()), "placement.md", "exec")


def gpu_snippet() -> str:
    (code,) = [c for p, c in blocks("guides/gpu.md", executed=False)]
    # The page loads pythia-1.4b from the hub; this machine has no network: the shipped model stands in.
    assert code.count('"EleutherAI/pythia-1.4b"') == 2
    return code.replace('"EleutherAI/pythia-1.4b"', '"neox-lab/default"')


def run_snippet(code: str) -> dict:
    namespace: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "docs/guides/gpu.md", "exec"), namespace)
    return namespace


def test_gpu_page_snippet_runs_on_cpu():
    """The same calls on the CPU (fp16 on sdpa): every name the page uses exists and computes."""
    code = gpu_snippet()
    cpu = (code.replace('.to("cuda")', '.to("cpu")').replace("ids.cuda()", "ids")
           .replace('device="cuda"', 'device="cpu"'))
    assert "cuda" not in re.sub(r"#.*", "", cpu), "the snippet's CUDA calls changed: update this substitution"
    ns = run_snippet(cpu)
    assert ns["model"].attn_kernels() and ns["cache"]["blocks.0.attn.hook_z"].dtype == torch.float16
    assert ns["lens"].cfg.dtype == torch.float16


@pytest.mark.gpu
def test_gpu_page_snippet_runs():
    ns = run_snippet(gpu_snippet())
    assert all(k.startswith(("flash", "sdpa")) for k in ns["model"].attn_kernels())
