"""The README's Python snippets run as written, one after the other in one process, as a new user would paste them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    """The first ```python block under the README heading `section`."""
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)


def test_python_usage_then_qlora_snippets_run_in_one_process(llama_dir, tmp_path):
    script = "\n".join(
        [
            "import json, warnings",
            "warnings.simplefilter('always')",
            "caught = warnings.catch_warnings(record=True)",
            "seen = caught.__enter__()",
            f"path, out = {str(llama_dir)!r}, {str(tmp_path / 'out')!r}",
            python_block("Python usage"),
            python_block("Fine-tuning with LoRA (QLoRA)"),
            "caught.__exit__(None, None, None)",
            "lora = [n for n, m in model.named_modules() if type(m).__name__ == 'LowBitLoraLinear']",
            "future = sorted({str(w.message) for w in seen if issubclass(w.category, FutureWarning)})",
            "print(json.dumps({'lora_layers': len(lora), 'future_warnings': future}))",
        ]
    )
    (tmp_path / "snippets.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "snippets.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["lora_layers"] == 2 * 7  # every projection of both decoder layers ("all-linear")
    # The snippets use transformers' current API. PEFT 0.21's get_peft_model itself still reads the deprecated
    # `model.is_gradient_checkpointing` (peft/peft_model.py), on any model; that one warning is not ours to fix.
    assert [w for w in report["future_warnings"] if "`is_gradient_checkpointing` is deprecated" not in w] == []
