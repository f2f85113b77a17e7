#!/usr/bin/env python3
"""Check that a built fastprop._native holds no instruction beyond x86-64-v2 outside
its AVX2 and AVX-512 units (the namespaces fastprop::avx2 and fastprop::avx512).

    python tools/check_isa_units.py path/to/_native*.so

The wheel must run on any x86-64-v2 CPU: the generic kernels, the dispatch and the
Cython glue may use SSE4.2 and POPCNT, nothing newer.  This also catches an inline or
template function that an ISA unit and the baseline both emit, of which the linker
keeps one copy: if it kept the AVX2 copy, the generic path would run AVX2 code.

It reads the disassembly by function (objdump -d -C), so the module must keep its
symbols: an installed module is stripped, and this says so (exit status 2).  .ci/run
checks an unstripped build of the same configuration.  Exit status 1 lists offenders.
"""

import re
import subprocess
import sys

#: 256/512-bit registers, AVX-512 masks, VEX/EVEX-encoded instructions, and the
#: BMI1/BMI2/LZCNT/MOVBE instructions (not in x86-64-v2)
BEYOND_V2 = re.compile(
    r"%[yz]mm|%k[0-7]\b"
    r"|^v(?!err|erw)[a-z]"
    r"|^(andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx"
    r"|lzcnt|tzcnt|movbe)\b")
ISA_UNITS = ("::avx2::", "::avx512::")


def scan(path):
    """(number of ISA-unit functions, {function: first offending instruction})."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(path)],
                         capture_output=True, text=True, timeout=600, check=True)
    func, isa_funcs, offenders = None, 0, {}
    in_unit = False  # (whether func belongs to an ISA unit)
    for line in out.stdout.splitlines():
        head = re.match(r"^([0-9a-f]+) <(.*)>:$", line)
        if head:
            func = head.group(2)
            if func.startswith(".omp"):
                # clang names a parallel region ".omp_outlined..N" (and its reduction,
                # task and copyprivate helpers ".omp.*"/".omp_*"), local symbols
                # without the namespace (GCC: "<function>._omp_fn.N"): each belongs to
                # the function laid out before it, in the same object's text
                func = f"{func} at 0x{head.group(1).lstrip('0')}"
            else:
                in_unit = any(u in func for u in ISA_UNITS)
                isa_funcs += in_unit
            continue
        parts = line.split("\t")
        if func is None or len(parts) < 2 or in_unit:
            continue
        insn = parts[-1].strip()
        if BEYOND_V2.search(insn):
            offenders.setdefault(func, insn)
    return isa_funcs, offenders


def main(argv):
    if len(argv) != 2:
        sys.exit(__doc__)
    isa_funcs, offenders = scan(argv[1])
    if not isa_funcs:
        print(f"{argv[1]}: no ISA-unit symbols (a stripped module?): cannot check")
        return 2
    if offenders:
        print("instructions beyond x86-64-v2 outside the ISA units:")
        for f, insn in list(offenders.items())[:40]:
            print(f"  {f[:140]}: {insn}")
        return 1
    print(f"{argv[1]}: {isa_funcs} ISA-unit functions; none outside uses AVX/AVX-512/BMI")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
