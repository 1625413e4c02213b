"""Helpers shared by the benchmark scripts: machine description, RESULTS.md."""

import datetime
import os
import platform
import re

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        if names:
            cpu = names[0].strip()
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), Python {platform.python_version()}"


def record(section, body):
    """Replace (or add) `## section` in RESULTS.md with `body`, dated."""
    today = datetime.date.today().isoformat()
    block = f"## {section}\n\n{today}, {machine()}.\n\n{body.strip()}\n"
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip() + "\n\n" + block
    with open(RESULTS, "w") as f:
        f.write(text.rstrip() + "\n")
    print(f"recorded in {RESULTS}")
