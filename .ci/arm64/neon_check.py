"""Check that the hot loops of aarch64 builds of edgefl's kernels are NEON code.

Disassembles each kernel module (aarch64-linux-gnu-objdump from binutils-aarch64-linux-gnu) and
looks, in the functions that hold each hot loop, for the vector instructions that loop compiles
to when GCC vectorises it. A helper that GCC inlined lives in the Cython function that calls it,
so each check names both. A loop that fell back to scalar code fails the check, as does a check
whose functions no longer exist (renamed code must be followed here, not silently skipped).

    python neon_check.py DIR_OR_WHEEL...     (directories holding clip*.so ..., or .whl files)
"""
import re
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

OBJDUMP = "aarch64-linux-gnu-objdump"

# module -> [(loop, functions holding it (regex), instructions it must contain (regexes))]
V = r"\s+v\d+"
CHECKS = {
    "clip": [
        ("clip_l2_ sum of squares: 4 floats widened to double, fused multiply-add on 2 doubles",
         r"edgefl_sum_squares|clip_l2_", [rf"fcvtl2{V}\.2d,\s*v\d+\.4s", rf"fmla{V}\.2d"]),
        ("clip_l1_ sum of magnitudes: 4 at a time, added as doubles", r"edgefl_sum_abs|clip_l1_",
         [rf"fabs{V}\.4s", rf"fadd{V}\.2d"]),
        ("scaling by the clip factor", r"edgefl_scale|clip_l[12]_", [rf"fmul{V}\.4s"]),
    ],
    "noise": [
        ("noise sign flips: product, sign-bit flip, add on 4 floats", r"edgefl_add_signed_scaled",
         [rf"fmul{V}\.4s", rf"eor{V}\.16b", rf"fadd{V}\.4s"]),
    ],
    "sgd": [
        ("SGD inner products (the register-tiled product)", r"edgefl_matmul",
         [rf"fmla{V}\.4s"]),
        ("SGD parameter update", r"edgefl_sgd_update|sgd__step", [rf"fml[as]{V}\.4s"]),
    ],
    "topk": [
        ("top-k collecting passes: block maxima and masks of 4 keys", r"edgefl_topk_collect",
         [rf"umax{V}\.4s", rf"cmhs{V}\.4s"]),
        ("radix top-k histogram: merging the interleaved counters", r"edgefl_topk_histogram|_topk_into",
         [rf"uaddw2{V}\.2d"]),
    ],
}

FUNCTION = re.compile(r"^[0-9a-f]+ <(?P<name>[^>]+)>:$")
INSTRUCTION = re.compile(r"^\s+[0-9a-f]+:\s+(?P<text>\S.*)$")


def functions(so: Path) -> dict[str, list[str]]:
    """Function name -> its instructions (mnemonic and operands), from the disassembly."""
    try:
        listing = subprocess.run([OBJDUMP, "-d", "--no-show-raw-insn", str(so)],
                                 capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        sys.exit(f"{OBJDUMP} not found: apt-get install binutils-aarch64-linux-gnu")
    body = defaultdict(list)
    name = None
    for line in listing.splitlines():
        if m := FUNCTION.match(line):
            name = m["name"]
        elif name and (m := INSTRUCTION.match(line)):
            body[name].append(m["text"])
    return body


def label(pattern: str) -> str:
    """'fmla .4s' for the pattern of an fmla on 4-float vectors."""
    mnemonic = re.match(r"[a-z0-9\[\]]+", pattern)[0]
    arrangement = re.search(r"[.](4s|2d|16b)", pattern)[1]
    return f"{mnemonic} .{arrangement}"


def check(so: Path, module: str) -> list[str]:
    """Failures of `module`'s checks on one shared object (empty when all pass)."""
    body = functions(so)
    failures = []
    for loop, pattern, wanted in CHECKS[module]:
        names = [n for n in body if re.search(pattern, n)]
        if not names:
            failures.append(f"{so.name}: no function matches {pattern!r} ({loop})")
            continue
        code = [i for n in names for i in body[n]]
        counts = {w: sum(1 for i in code if re.match(w, i)) for w in wanted}
        missing = [w for w, c in counts.items() if c == 0]
        found = ", ".join(f"{label(w)} x{c}" for w, c in counts.items())
        if missing:
            failures.append(f"{so.name}: {loop}: no {missing} in {names}: the loop is scalar")
        else:
            print(f"  NEON {module}: {loop}: {found} in {', '.join(names)}")
    return failures


def shared_objects(paths: list[Path], scratch: Path) -> dict[str, Path]:
    """Kernel module name -> its aarch64 .so, from directories or wheels."""
    found = {}
    for path in paths:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as wheel:
                for member in wheel.namelist():
                    if member.startswith("edgefl/_kernels/") and member.endswith(".so"):
                        found[Path(member).name.split(".")[0]] = Path(wheel.extract(member, scratch))
        else:
            for so in path.glob("*.so"):
                found[so.name.split(".")[0]] = so
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    failures = []
    with tempfile.TemporaryDirectory() as scratch:
        for path in map(Path, argv):
            print(f"NEON check of {path}")
            modules = shared_objects([path], Path(scratch))
            for module in CHECKS:
                if module not in modules:
                    failures.append(f"{path}: kernel module {module} not found")
                else:
                    failures += check(modules[module], module)
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
