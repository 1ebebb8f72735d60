"""`moekit refine`: a math_tasks model's draft answers corrected by an OpenAI-compatible endpoint.

One library call (moekit.infer.refine.refine_checkpoint) and printing; with
--out, the results as JSON lines (written to a temporary file, then renamed).
Heavy imports happen inside the handler. Not here: drafting, the HTTP request
(moekit.infer.refine), the parser itself (main.py).
"""

from __future__ import annotations


def _refine(args) -> int:
    import json
    import os
    from pathlib import Path

    from ..infer.refine import refine_checkpoint

    report = refine_checkpoint(args.checkpoint, args.endpoint, args.model, args.api_key or os.environ.get("OPENAI_API_KEY"),
                               task=args.task, prompt=args.prompt, problems=args.problems, examples=args.examples)
    for r in report["results"]:
        mark = "" if not report["scored"] else ("  ok" if r.answer == r.problem.answer else f"  (expected {r.problem.answer})")
        print(f"[{r.problem.task}] {r.problem.prompt}  draft {r.draft!r} -> refined {r.answer!r}{mark}")
    if report["scored"]:
        n = len(report["results"])
        print(f"exact match on {n} test problems: draft {100 * report['draft_accuracy']:.1f}%, "
              f"refined {100 * report['refined_accuracy']:.1f}%")
    if args.out:
        rows = [{"task": r.problem.task, "prompt": r.problem.prompt, "expected": r.problem.answer or None,
                 "draft": r.draft, "refined": r.answer, "reply": r.reply} for r in report["results"]]
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


def add_parsers(sub) -> None:
    """Register refine on the `moekit` subparsers."""
    p = sub.add_parser("refine", help="correct a math_tasks model's draft answers with an OpenAI-compatible endpoint")
    p.add_argument("checkpoint", help="a run or checkpoint trained with data.kind=math_tasks")
    p.add_argument("--endpoint", required=True, help="the endpoint's OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True, help="the model name the endpoint serves")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY, if set)")
    p.add_argument("--task", help="only this task's problems (required with --prompt)")
    p.add_argument("--prompt", help="one problem of --task to draft and refine (default: the model's test problems)")
    p.add_argument("--problems", type=int, default=5, help="test problems per task (default 5)")
    p.add_argument("--examples", type=int, default=3, help="solved training examples sent with each problem (default 3)")
    p.add_argument("--out", help="also write the results as JSON lines here")
    p.set_defaults(handler=_refine)


__all__ = ["add_parsers"]
