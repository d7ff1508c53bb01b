"""Count references to VAR's internal structure in a package: code tokens and prose (comments, docstrings) apart.

    python scripts/structure_refs.py varq/quant            # per file, then the totals
    python scripts/structure_refs.py varq/quant --code     # only files whose code (not prose) names VAR's structure

A reference is a name or a string token containing one of VAR's submodule/attribute names (``blocks``,
``mat_qkv``, ``ada_lin``, ``patch_nums`` …). Outside ``varq/models`` the code should reach them only through the
model adapter (``varq.models.adapter``), so the code count of ``varq/quant`` is the measure of that rule; the test
suite checks it stays 0.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
import tokenize
from pathlib import Path

VAR_NAMES = (
    "blocks", "patch_nums", "lvl_1L", "begin_ends", "first_l", "class_emb", "head_nm", "word_embed", "pos_start",
    "shared_ada_lin", "attn_bias_for_masking", "get_logits", "run_blocks", "lvl_pos_1LC", "set_kv_caching",
    "mat_qkv", "fc1", "fc2", "ada_lin", "ln_wo_grad", "q_bias", "v_bias", "zero_k_bias", "Cvae",
)
PATTERN = re.compile(r"\b(" + "|".join(VAR_NAMES) + r")\b")


def count_file(path: Path) -> tuple[int, int]:
    """(references in code, references in comments and docstrings) of one Python file."""
    code = prose = 0
    previous = tokenize.NEWLINE
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        hits = len(PATTERN.findall(tok.string)) if tok.type in (tokenize.NAME, tokenize.STRING, tokenize.COMMENT) else 0
        # a string token that starts a logical line is a docstring (or a bare string statement): prose
        is_docstring = tok.type == tokenize.STRING and previous in (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
        if tok.type == tokenize.COMMENT or is_docstring:
            prose += hits
        else:
            code += hits
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            previous = tok.type
    return code, prose


def count_tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): count_file(p) for p in sorted(root.rglob("*.py"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--code", action="store_true", help="only files with references in code")
    args = parser.parse_args(argv)
    counts = count_tree(args.root)
    for path, (code, prose) in counts.items():
        if code or (prose and not args.code):
            print(f"{code:4d} code {prose:4d} prose  {path}")
    total_code = sum(c for c, _ in counts.values())
    total_prose = sum(p for _, p in counts.values())
    print(f"{total_code:4d} code {total_prose:4d} prose  total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
