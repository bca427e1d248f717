"""Counting the instructions of each function of a .wasm file (wabt's wasm-objdump), for the disassembly checks."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path


def wasm_ops(path: Path) -> dict[str, dict[str, int]]:
    """``{function name: {opcode: count}}`` of ``path``; needs ``wasm-objdump`` on the PATH."""
    objdump = shutil.which("wasm-objdump")
    dis = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True).stdout
    count: dict[str, dict[str, int]] = {}
    name = ""
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ func\[\d+\] <(.*)>:", line)
        if m:
            name = m.group(1)
            continue
        if "|" in line:
            op = line.split("|", 1)[1].split()
            if op:
                count.setdefault(name, {}).setdefault(op[0], 0)
                count[name][op[0]] += 1
    return count
