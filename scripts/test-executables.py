#!/usr/bin/env python3
"""Reads `cargo test --no-run --message-format=json...` on stdin and prints the path of every test
executable it built, one per line, except the targets named after `--skip`.

    cargo test --release --no-run --message-format=json-render-diagnostics \\
        | python3 scripts/test-executables.py --skip ptxas_gate kernel_emulator
"""
import json
import sys

skip = set(sys.argv[sys.argv.index("--skip") + 1:]) if "--skip" in sys.argv else set()
for line in sys.stdin:
    message = json.loads(line)
    if (message.get("reason") == "compiler-artifact" and message.get("executable")
            and message["profile"]["test"] and message["target"]["name"] not in skip):
        print(message["executable"])
