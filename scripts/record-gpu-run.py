#!/usr/bin/env python3
"""Records a GPU run in bench/results/<date>-<gpu>/ and in README.md's results table.

Give it the `files_at` folder of each `bash .gpu-run/run.sh verify|sanitize` call of one
session, in the order they ran (scripts/gpu-remote.sh says what each call writes):

    python3 scripts/record-gpu-run.py [--dest DIR] [--no-readme] OUT_DIR [OUT_DIR ...]

It writes the folder's README.md (device, driver, commit, every part's time, test counts per
binary, sanitizer summary, the benchmark table: time, GB/s, fraction of the measured copy
bandwidth, PyTorch's best backend and the ratio to it), copies the machine-readable files and
the logs (xz-compressed above 256 KiB), and replaces the table between the README's
`<!-- gpu-results -->` markers with the run's headline. Nothing in it is typed by hand.
`--self-test` records a made-up run in a temporary folder and checks what it wrote.
"""

import argparse
import json
import lzma
import os
import re
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"
LOGS = ("tests.log", "bench.log", "sanitizer.log")


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def device_info(dirs):
    """date, GPU, driver, memory, kernel, commit from the first call's device.txt."""
    for d in dirs:
        path = os.path.join(d, "device.txt")
        if os.path.exists(path):
            lines = read(path).splitlines()
            info = {"date": lines[0][:10], "when": lines[0]}
            gpu = [p.strip() for p in lines[1].split(",")] if len(lines) > 1 else []
            info["gpu"], info["driver"], info["memory"] = (gpu + ["?", "?", "?"])[:3]
            for line in lines[2:]:
                key, _, value = line.partition(": ")
                info[key] = value
            return info
    sys.exit("no device.txt in the given folders: not the output of scripts/gpu-remote.sh")


def test_counts(log, summaries):
    """Per binary: tests passed and failed (its `test ... ok|FAILED` lines, so a binary cut off
    by the budget still counts what it finished) and how the binary ended (summary.txt)."""
    counts, name = {}, None
    for line in log.splitlines():
        if line.startswith("=== "):
            name = line[4:].strip()
            counts[name] = [0, 0, "?"]
        elif name and re.match(r"test .* \.\.\. ok$", line):
            counts[name][0] += 1
        elif name and re.match(r"test .* \.\.\. FAILED$", line):
            counts[name][1] += 1
    for text in summaries:
        for line in text.splitlines():
            m = re.match(r"(\S+)\s+(\d+s\s+)?(ok|FAILED \(exit \d+\)|TIMED OUT after \d+s|NOT RUN \(budget spent\))", line)
            if m and m.group(1) in counts:
                counts[m.group(1)][2] = m.group(3)
            elif m and m.group(3).startswith("NOT RUN"):
                counts.setdefault(m.group(1), [0, 0, m.group(3)])
    return counts


def sanitizer_counts(log):
    """Per (tool, binary): the sanitizer's summary line, or why there is none."""
    result, key = {}, None
    for line in log.splitlines():
        if line.startswith("=== "):
            key = line[4:].strip()
            result[key] = "no summary (did not finish)"
        elif key and ("SUMMARY" in line or "Device not supported" in line):
            result[key] = line.strip("= ").strip()
    return result


def fmt_us(v):
    return "-" if v is None else (f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.1f} us")


def fmt(v, spec, tail=""):
    return "-" if v is None else format(v, spec) + tail


def bench_rows(doc):
    """Table rows from comparison.json (or ours.json when PyTorch's side did not run)."""
    rows = []
    for r in doc.get("rows", []):
        ours = r.get("ours_us", r.get("time_us"))  # comparison.json, else ours.json
        bytes_min = r.get("bytes_min")
        gbs = bytes_min / (ours * 1e3) if bytes_min and ours else r.get("gbs_min")
        rows.append({
            "name": r["name"], "ours_us": ours, "gbs": gbs,
            "frac": r.get("ours_frac_copy_min", r.get("frac_copy_min")),
            "torch_us": r.get("best_torch_us"), "torch": r.get("best_torch"),
            "ratio": r.get("speedup_vs_best_torch"),
            "ok": r.get("ours_ok", r.get("ok")),
        })
    return rows


def bench_table(rows):
    out = ["| row | ours | GB/s | of copy bw | PyTorch best (backend) | speedup | checked |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        torch = "-" if r["torch_us"] is None else f"{fmt_us(r['torch_us'])} ({r['torch'] or '?'})"
        ok = {True: "ok", False: "WRONG", None: "-"}[r["ok"]]
        out.append(f"| `{r['name']}` | {fmt_us(r['ours_us'])} | {fmt(r['gbs'], '.0f')} | "
                   f"{fmt(r['frac'] and r['frac'] * 100, '.0f', ' %')} | {torch} | "
                   f"{fmt(r['ratio'], '.2f', 'x')} | {ok} |")
    return out


def record(dirs, dest, readme):
    info = device_info(dirs)
    gpu_slug = re.sub(r"[^a-z0-9-]", "", info["gpu"].lower().replace(" ", "-")) or "unknown-gpu"
    dest = dest or os.path.join(ROOT, "bench", "results", f"{info['date']}-{gpu_slug}")
    os.makedirs(dest, exist_ok=True)

    summaries, logs, comparison, ours = [], {name: "" for name in LOGS}, None, None
    for d in dirs:
        path = os.path.join(d, "summary.txt")
        if os.path.exists(path):
            summaries.append((os.path.basename(os.path.normpath(d)), read(path).rstrip()))
        for name in LOGS:
            if os.path.exists(os.path.join(d, name)):
                logs[name] += read(os.path.join(d, name))
        for name in ("comparison.json", "ours.json", "tables.md"):
            src = os.path.join(d, name)
            if os.path.exists(src):
                shutil.copy(src, os.path.join(dest, name))
                if name == "comparison.json":
                    comparison = json.loads(read(src))
                elif name == "ours.json":
                    ours = json.loads(read(src))
    for name, text in logs.items():
        if not text:
            continue
        data = text.encode()
        if len(data) > 256 * 1024:
            with lzma.open(os.path.join(dest, name + ".xz"), "wb", preset=9) as f:
                f.write(data)
        else:
            with open(os.path.join(dest, name), "wb") as f:
                f.write(data)

    tests = test_counts(logs["tests.log"], [text for _, text in summaries])
    sanitizer = sanitizer_counts(logs["sanitizer.log"])
    doc = comparison or ours
    rows = bench_rows(doc) if doc else []
    passed = sum(c[0] for c in tests.values())
    failed = sum(c[1] for c in tests.values())
    unfinished = sorted(b for b, c in tests.items() if c[2] != "ok" and not c[2].startswith("FAILED"))

    md = [f"# GPU run of {info['date']}: {info['gpu']}", "",
          f"- device: {info['gpu']}, driver {info['driver']}, {info['memory']}",
          f"- started: {info['when']}; {info.get('kernel', '?')}",
          f"- commit: {info.get('commit', 'unknown')}",
          f"- tests: {passed} passed, {failed} failed in {len(tests)} binaries"
          + (f"; did not finish: {', '.join(unfinished)}" if unfinished else ""), ""]
    if doc and doc.get("header"):
        h = doc["header"]
        md += [f"- benchmark: torch {h.get('torch')}, CUDA {h.get('torch_cuda')}, cuDNN {h.get('cudnn')}; "
               f"copy yardstick {h.get('ours_copy_gbs')} GB/s (ours), {h.get('torch_copy_gbs')} GB/s (PyTorch's)", ""]
    md += ["## Each call, as it reported itself", ""]
    for name, text in summaries:
        md += [f"`{name}`:", "", "```", text, "```", ""]
    md += ["## Tests per binary", "", "| binary | passed | failed | ended |", "| --- | --- | --- | --- |"]
    md += [f"| {b} | {p} | {f} | {e} |" for b, (p, f, e) in tests.items()]
    md += ["", "## compute-sanitizer", ""]
    md += [f"- {k}: {v}" for k, v in sanitizer.items()] or ["Not run."]
    md += ["", "## Benchmark", ""]
    if rows:
        geo = (comparison or {}).get("geomean_speedup_vs_best_torch")
        if geo:
            md += [f"Geometric-mean speedup over PyTorch's best backend, per op: {json.dumps(geo)}", ""]
        md += bench_table(rows)
    else:
        md += ["Not run."]
    with open(os.path.join(dest, "README.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    if readme:
        rel = os.path.relpath(dest, os.path.dirname(readme))
        headline = [BEGIN,
                    f"{info['date']}, {info['gpu']} (driver {info['driver']}), commit "
                    f"`{info.get('commit', 'unknown')[:12]}`: tests {passed} passed, {failed} failed"
                    + (f" (did not finish: {', '.join(unfinished)})" if unfinished else "") + "; "
                    f"sanitizer: {', '.join(sorted(set(sanitizer.values()))) or 'not run'}. "
                    f"Details in [`{rel}`]({rel}/README.md).", ""]
        headline += bench_table(rows) if rows else ["No benchmark in this run."]
        headline.append(END)
        text = read(readme)
        if BEGIN not in text or END not in text:
            sys.exit(f"{readme} has no {BEGIN} ... {END} markers")
        start, stop = text.index(BEGIN), text.index(END) + len(END)
        with open(readme, "w") as f:
            f.write(text[:start] + "\n".join(headline) + text[stop:])
    print(f"recorded in {dest}: {sorted(os.listdir(dest))}")
    return dest


def self_test():
    with tempfile.TemporaryDirectory() as tmp:
        call1, call2 = os.path.join(tmp, "call1"), os.path.join(tmp, "call2")
        for d in (call1, call2):
            os.makedirs(d)
            with open(os.path.join(d, "device.txt"), "w") as f:
                f.write("2026-12-02T04:00Z\nNVIDIA H200, 580.00, 143771 MiB\nkernel: 6.1-fc\ncommit: abc123\n")
        files = {
            (call1, "summary.txt"): "gpu_forward  12s  ok\ngpu_sync  30s  FAILED (exit 101)\n"
                                    "gpu_scale                    NOT RUN (budget spent)\n",
            (call1, "tests.log"): "=== gpu_forward\ntest a ... ok\ntest b ... ok\ntest result: ok. 2 passed; 0 failed\n"
                                  "=== gpu_sync\ntest c ... ok\ntest d ... FAILED\ntest result: FAILED. 1 passed; 1 failed\n",
            (call2, "sanitizer.log"): "=== memcheck gpu_forward\n========= ERROR SUMMARY: 0 errors\n"
                                      "=== racecheck gpu_forward\n",
            (call1, "comparison.json"): json.dumps({"header": {"torch": "2.9"}, "rows": [
                {"name": "bn_fwd/f16/32x256x56x56/channels_last", "ours_us": 40.0, "bytes_min": 102760448,
                 "ours_frac_copy_min": 0.6, "best_torch_us": 80.0, "best_torch": "cudnn",
                 "speedup_vs_best_torch": 2.0, "ours_ok": True}]}),
        }
        for (d, name), text in files.items():
            with open(os.path.join(d, name), "w") as f:
                f.write(text)
        readme = os.path.join(tmp, "README.md")
        with open(readme, "w") as f:
            f.write(f"intro\n{BEGIN}\nold\n{END}\nrest\n")
        dest = record([call1, call2], os.path.join(tmp, "rec"), readme)
        page, top = read(os.path.join(dest, "README.md")), read(readme)
        expect = ["tests: 3 passed, 1 failed in 3 binaries; did not finish: gpu_scale",
                  "| gpu_sync | 1 | 1 | FAILED (exit 101) |", "| gpu_forward | 2 | 0 | ok |",
                  "memcheck gpu_forward: ERROR SUMMARY: 0 errors",
                  "racecheck gpu_forward: no summary (did not finish)",
                  "| `bn_fwd/f16/32x256x56x56/channels_last` | 40.0 us | 2569 | 60 % | 80.0 us (cudnn) | 2.00x | ok |"]
        missing = [e for e in expect if e not in page]
        assert not missing, f"missing from the run's page: {missing}\n{page}"
        assert top.startswith("intro\n") and top.endswith("\nrest\n") and "old" not in top, top
        assert "2.00x" in top, top
    print("record-gpu-run self-test: ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--dest")
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    if args.self_test:
        return self_test()
    if not args.dirs:
        ap.error("give the output folder of each call")
    record(args.dirs, args.dest, None if args.no_readme else os.path.join(ROOT, "README.md"))


if __name__ == "__main__":
    main()
