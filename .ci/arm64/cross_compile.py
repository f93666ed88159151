"""Cross-compile edgefl's kernels for aarch64 on the build host: a compile error shows up in a
minute or two, before the emulated build.

The extensions, their Cython directives and compiler flags come from setup.py itself; only the
compiler (aarch64-linux-gnu-gcc) and the headers and libraries (CPython's for arm64 from Debian,
NumPy's from its aarch64 wheel) are those of the target. Every kernel must build: unlike an
install, where a failed kernel falls back to the NumPy twin, here a failure is the point.

    python cross_compile.py --python-include DIR --numpy DIR --out DIR
"""
import argparse
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CC = "aarch64-linux-gnu-gcc"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python-include", type=Path, required=True,
                        help="root of libpython3.X-dev:arm64 unpacked (holds usr/include)")
    parser.add_argument("--numpy", type=Path, required=True,
                        help="NumPy's aarch64 wheel unpacked (holds numpy/_core/include)")
    parser.add_argument("--out", type=Path, required=True, help="where the .so files go")
    args = parser.parse_args()

    os.chdir(ROOT)  # setup.py names its sources relative to the checkout
    sys.path.insert(0, str(ROOT))
    import setup as build  # setup.py: imported, it describes the kernels and builds nothing
    from Cython.Build import cythonize

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    numpy_include = args.numpy / "numpy" / "_core" / "include"
    numpy_random = args.numpy / "numpy" / "random" / "lib"
    host_numpy = {build.np.get_include(), build.numpy_random_lib}
    include = [args.python_include / "usr" / "include" / version,
               args.python_include / "usr" / "include", numpy_include]
    # What setuptools puts in front of every compile (Debian's Python: -DNDEBUG -fwrapv -O2 ...;
    # the extension's -O3 comes later and wins).
    base_flags = shlex.split(sysconfig.get_config_var("CFLAGS")) + ["-fPIC"]

    args.out.mkdir(parents=True, exist_ok=True)
    c_dir = args.out / "c"
    modules = cythonize(build.extensions, compiler_directives=build.directives, quiet=True,
                        build_dir=str(c_dir))
    failed = []
    for ext in modules:
        name = ext.name.rsplit(".", 1)[-1]
        command = [CC, "-shared", *base_flags, *ext.extra_compile_args]
        command += [f"-D{k}={v}" if v is not None else f"-D{k}" for k, v in ext.define_macros]
        command += [f"-I{d}" for d in include]
        command += [f"-I{ROOT / d}" for d in ext.include_dirs if d not in host_numpy]
        command += [str(ROOT / s) if not Path(s).is_absolute() else s for s in ext.sources]
        command += ["-o", str(args.out / f"{name}.so")]
        command += [f"-L{numpy_random}" for d in ext.library_dirs if d in host_numpy]
        command += [f"-l{lib}" for lib in ext.libraries]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            failed.append(name)
            print(f"{name}: aarch64 compile failed\n{shlex.join(command)}\n{result.stderr}",
                  file=sys.stderr)
        else:
            print(f"{name}: built for aarch64", file=sys.stderr)
    if failed:
        print(f"cross-compile for aarch64 failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
