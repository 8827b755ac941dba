"""`trainer report RUN ... --html report.html`: the runs side by side in one self-contained file.

Nothing is fetched when it opens: the pictures are inlined (data: URIs) and the little script that sorts
the tables is in the page. It shows the runs (the exported file's held-out score as graded, its score
on fresh images where `trainer eval --save RUN/eval.json` wrote one, size, steps, speed, whether
student.pt is still the file the run exported), the settings that differ between them (highlighted;
the shared ones folded away), each class's F1 per run, and each run's curves, confusion matrix and
per-class F1. Click a column's head to sort by it; `report.html#sort=<column>` opens it sorted.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from featurestore.common.untrusted import read_json
from trainer.tables import eval_of, file_state, summary_of
from trainer.trackers import flatten

PICTURES = ("curves.png", "confusion.png", "per_class_f1.png")
SKIP_KEYS = {"out", "store_attrs", "package_version", "git_sha", "python", "torch", "created", "host"}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1b1b1b;background:#fff}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px}
table{border-collapse:collapse;margin:4px 0}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left}
th{background:#f3f3f3;cursor:pointer;user-select:none}th.sorted-asc:after{content:" \\25B2"}
th.sorted-desc:after{content:" \\25BC"}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.differs{background:#fff3c4}tr.best td{font-weight:600}.note{color:#666}
.run{border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.run img{max-width:32%;margin-right:1%;vertical-align:top}details{margin:6px 0}
"""

SCRIPT = """
function cellValue(td){const v=td.getAttribute('data-value');if(v!==null&&v!==''&&!isNaN(Number(v)))return Number(v);
  return td.textContent.trim().toLowerCase();}
function sortTable(table,col,desc){const body=table.tBodies[0];const rows=Array.from(body.rows);
  rows.sort((a,b)=>{const x=cellValue(a.cells[col]),y=cellValue(b.cells[col]);
    if(x===y)return 0;const r=(typeof x==='number'&&typeof y==='number')?x-y:String(x).localeCompare(String(y));
    return desc?-r:r;});
  rows.forEach(r=>body.appendChild(r));
  Array.from(table.tHead.rows[0].cells).forEach((th,i)=>{th.classList.remove('sorted-asc','sorted-desc');
    if(i===col)th.classList.add(desc?'sorted-desc':'sorted-asc');});
  table.setAttribute('data-sorted',table.tHead.rows[0].cells[col].getAttribute('data-key')+(desc?':desc':':asc'));}
document.querySelectorAll('table.sortable').forEach(table=>{
  Array.from(table.tHead.rows[0].cells).forEach((th,i)=>th.addEventListener('click',()=>{
    sortTable(table,i,!th.classList.contains('sorted-desc'));}));});
const m=location.hash.match(/sort=([\\w.:-]+)/);
if(m){document.querySelectorAll('table.sortable').forEach(table=>{
  Array.from(table.tHead.rows[0].cells).forEach((th,i)=>{if(th.getAttribute('data-key')===m[1])sortTable(table,i,true);});});}
document.body.setAttribute('data-ready','1');
"""


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def _cell(value, key: str = "", cls: str = "") -> str:
    if isinstance(value, float):
        text, num = f"{value:.3f}", repr(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        text, num = str(value), str(value)
    else:
        text, num = ("-" if value is None else str(value)), ""
    classes = " ".join(c for c in (cls, "num" if num else "") if c)
    return (f'<td{f" class={chr(34)}{classes}{chr(34)}" if classes else ""} data-value="{html.escape(num)}"'
            f'{f" data-key={chr(34)}{key}{chr(34)}" if key else ""}>{html.escape(text)}</td>')


def _head(cols: list[tuple[str, str]]) -> str:
    return "<thead><tr>" + "".join(f'<th data-key="{html.escape(k)}">{html.escape(t)}</th>' for k, t in cols) + \
        "</tr></thead>"


def _config(run: Path) -> dict:
    path = run / "config.yaml"
    if not path.is_file():
        return {}
    from featurestore.common.untrusted import load_yaml
    d = load_yaml(path)
    return flatten({k: v for k, v in d.items() if k not in SKIP_KEYS})


def collect(runs: list[Path]) -> list[dict]:
    """What the page shows of each run (raises a one-line error for a run that did not finish)."""
    out = []
    for run in runs:
        s = summary_of(run)
        e = eval_of(run / "eval.json") if (run / "eval.json").is_file() else None
        held = read_json(run / "held_out.json", "run the fit again") if (run / "held_out.json").is_file() else None
        out.append({"name": run.name, "path": str(run), "summary": s, "eval": e, "held_out": held,
                    "config": _config(run), "state": file_state(run, e),
                    "pictures": [run / p for p in PICTURES if (run / p).is_file()]})
    return out


def render(runs: list[Path], title: str = "kdstore runs") -> str:
    data = collect(runs)
    cols = [("run", "run"), ("student", "student"), ("steps", "optimizer steps"),
            ("held_out", "held-out macro-F1 (student.pt, as graded)"), ("fresh", "macro-F1 on fresh images"),
            ("size_mb", "MB"), ("best_epoch", "best epoch"), ("samples_per_s", "samples/s"),
            ("teacher", "teacher probe (held-out)"), ("file", "student.pt")]
    best = max((d["summary"].get("val_macro_f1") or -1 for d in data), default=-1)
    rows = []
    for d in data:
        s, e = d["summary"], d["eval"]
        values = [d["name"], s.get("student"), s.get("steps"), s.get("val_macro_f1"),
                  e["macro_f1"] if e else None, s.get("size_mb"), s.get("best_epoch"), s.get("samples_per_s"),
                  s.get("teacher_probe_val_macro_f1"), d["state"]]
        mark = ' class="best"' if s.get("val_macro_f1") == best and len(data) > 1 else ""
        rows.append(f"<tr{mark}>" + "".join(_cell(v, k) for v, (k, _) in zip(values, cols)) + "</tr>")
    parts = [f"<h1>{html.escape(title)}</h1>",
             f'<p class="note">{len(data)} run(s). The held-out figure is the exported student.pt scored as the '
             "grader scores (224 px, ImageNet mean and std, macro-F1); fresh images: `trainer eval --save "
             "RUN/eval.json`. Click a column to sort.</p>",
             '<h2>Runs</h2><table class="sortable" id="runs">' + _head(cols) + "<tbody>" + "".join(rows) +
             "</tbody></table>"]
    parts.append(_settings(data))
    parts.append(_per_class(data))
    for d in data:
        weakest = d["summary"].get("val_weakest") or []
        parts.append(f'<div class="run" id="run-{html.escape(d["name"])}"><h2>{html.escape(d["name"])}</h2>'
                     f'<p class="note">{html.escape(d["path"])}'
                     + (f"; weakest classes: {html.escape(', '.join(map(str, weakest)))}" if weakest else "")
                     + "</p>" + "".join(_img(p) for p in d["pictures"]) + "</div>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>" + html.escape(title) + "</title><style>"
            + STYLE + "</style></head><body>" + "\n".join(parts) + "<script>" + SCRIPT + "</script></body></html>")


def _settings(data: list[dict]) -> str:
    keys = sorted(set().union(*(d["config"] for d in data)))
    differ = [k for k in keys if len({json.dumps(d["config"].get(k), sort_keys=True) for d in data}) > 1]
    same = [k for k in keys if k not in differ]
    head = _head([("setting", "setting")] + [(d["name"], d["name"]) for d in data])
    rows = "".join("<tr>" + _cell(k) + "".join(_cell(d["config"].get(k), cls="differs") for d in data) + "</tr>"
                   for k in differ)
    shared = "".join("<tr>" + _cell(k) + _cell(data[0]["config"].get(k)) + "</tr>" for k in same)
    return (f"<h2>Settings that differ ({len(differ)})</h2>"
            + (f'<table class="sortable" id="settings">{head}<tbody>{rows}</tbody></table>' if differ else
               '<p class="note">none: the runs share every setting</p>')
            + f"<details><summary>settings every run shares ({len(same)})</summary><table>"
            + _head([("setting", "setting"), ("value", "value")]) + f"<tbody>{shared}</tbody></table></details>")


def _per_class(data: list[dict]) -> str:
    have = [d for d in data if d["held_out"] and d["held_out"].get("per_class")]
    if not have:
        return ""
    classes = have[0]["held_out"]["classes"]
    head = _head([("class", "class")] + [(d["name"], d["name"]) for d in have])
    rows = []
    for c, name in enumerate(classes):
        rows.append("<tr>" + _cell(name) + "".join(_cell(float(d["held_out"]["per_class"][c]["f1"]))
                                                   for d in have) + "</tr>")
    return ('<h2>F1 per class (held-out, student.pt as graded)</h2><table class="sortable" id="per-class">'
            + head + "<tbody>" + "".join(rows) + "</tbody></table>")


def write(runs: list[Path], path: str | Path, title: str = "kdstore runs") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render([Path(r) for r in runs], title), encoding="utf-8")
    return path

