"""The README's first lines are the two commands a newcomer types; they must stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.index("```bash") < 20, "the README starts with its set-up commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_starts_with_the_demo_and_the_test_commands():
    install_and_demo, tests = _first_block()
    assert install_and_demo.startswith("pip install -e . && r2unet demo")
    assert tests.startswith('pip install -e ".[dev]" && python -m pytest -q')
    assert "after installing torch" not in tests  # the first line installs torch; nothing else is needed
    ci = (ROOT / ".ci" / "run").read_text()
    command = tests.split("&&")[1].split("#")[0].strip()  # python -m pytest ...
    assert f"\n{command}\n" in ci and '".[dev]"' in ci  # CI runs the README's test command, options and all


def test_the_readme_says_in_one_line_how_a_machine_without_a_gpu_takes_the_cpu_build():
    text = (ROOT / "README.md").read_text()
    after = text[text.index("```", text.index("```bash") + 3) + 3:]
    paragraph = after.strip().split("\n\n")[0]
    assert "No NVIDIA GPU?" in paragraph
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in paragraph
