"""The forecasting subcommands of `moekit`: train-forecaster, forecast, eval-forecast.

Glue only: each handler parses its flags, calls one library function
(`moekit.train.forecaster.train_forecaster`, `moekit.infer.forecast.forecast_csv`,
`moekit.infer.forecast_eval.evaluate_csv`) and prints. Heavy imports happen inside the
handlers. Data repairs (filled gaps, skipped columns) are printed as one-line
warnings; user mistakes raise MoekitError, which `moekit.cli` prints without a
traceback (exit status 2).
"""

from __future__ import annotations

import contextlib
import sys
import warnings


@contextlib.contextmanager
def _plain_warnings(command: str):
    """Show data warnings as one line each, without the source line Python adds."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"moekit {command}: warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


def _train(args) -> int:
    from ..train.forecaster import train_forecaster
    from .paths import out_dir

    out_dir(args.out)
    if args.resume and (args.init or args.overrides or args.date_format or args.dayfirst or args.columns):
        print("note: --resume continues with the run's saved config; --init, overrides and date options are ignored",
              file=sys.stderr)
    with _plain_warnings("train-forecaster"):
        summary = train_forecaster(args.csv or [], args.out, preset_name=args.preset, overrides=args.overrides,
                                   init=args.init, resume=args.resume, progress=not args.quiet,
                                   date_format=args.date_format, dayfirst=args.dayfirst, columns=args.columns)
    result = summary["result"]
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint} (continue with --resume)")
        return 130
    from .train import steps_done, steps_in_all

    print(f"trained {steps_done(result)} in {summary['seconds'] / 60:.1f} min on {', '.join(summary['datasets'])} "
          f"({summary['points']:,} train points){steps_in_all(result)}")
    print(f"parameters: {summary['parameters']:,} total, {summary['active_parameters']:,} active per time point")
    if result.last_eval:
        print(f"validation Huber loss {result.last_eval['val_huber']:.4f}")
    print(f"checkpoint: {result.checkpoint}")
    return 0


def _forecast(args) -> int:
    from ..infer.forecast import forecast_csv
    from .paths import out_file

    out_file(args.out)
    if args.plot:
        out_file(args.plot, "--plot", example="forecast.png")
    with _plain_warnings("forecast"):
        res = forecast_csv(args.model, args.csv, args.horizon, context=args.context, out=args.out, plot=args.plot,
                           date_format=args.date_format, dayfirst=args.dayfirst, columns=args.columns)
    print(f"forecast {len(res.timestamps)} steps of {len(res.channels)} channel(s) ({', '.join(res.channels)}) "
          f"from {res.timestamps[0]} to {res.timestamps[-1]}, context {res.context}")
    print(f"wrote {res.out}")
    if res.plot is not None:
        print(f"plot: {res.plot}")
    return 0


def _eval(args) -> int:
    import json
    from pathlib import Path

    from ..infer.forecast_eval import evaluate_csv, parse_horizons, results_dicts, results_table
    from .paths import out_file, written

    if args.out:
        out_file(args.out, example="results.json")
    horizons = parse_horizons(args.horizons)
    with _plain_warnings("eval-forecast"):
        results = evaluate_csv(args.model, args.csv, horizons, context=args.context, stride=args.stride,
                               with_baselines=not args.no_baselines, progress=not args.quiet,
                               date_format=args.date_format, dayfirst=args.dayfirst, columns=args.columns)
    print(f"MSE / MAE on the scaled test split, context {args.context}, stride {args.stride}:")
    print(results_table(results))
    if args.out:
        with written(args.out):
            Path(args.out).write_text(json.dumps({"context": args.context, "stride": args.stride,
                                                  "results": results_dicts(results)}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def _add_date_options(p) -> None:
    p.add_argument("--date-format", metavar="FMT",
                   help="strftime format of the date column, e.g. '%%d/%%m/%%Y %%H:%%M' (default: inferred)")
    p.add_argument("--dayfirst", action="store_true",
                   help="read ambiguous dates such as 03/04/2020 day-first (4 March); without it or --date-format "
                        "they are refused")
    p.add_argument("--columns", metavar="A,B,C",
                   help="the columns to forecast, comma-separated (default: every numeric column)")


def add_parsers(sub) -> None:
    """Register train-forecaster, forecast and eval-forecast on the `moekit` subparsers."""
    p = sub.add_parser("train-forecaster", help="train or fine-tune a Time-MoE forecaster on CSV files")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.steps=500 model.hidden_size=96 train.seq_len=256")
    p.add_argument("--csv", action="append", metavar="FILE",
                   help="a CSV (date column + numeric channels); repeat for a mixture. Trains on the train split")
    p.add_argument("--preset", default="tiny", help="model preset: tiny (CPU), base (TimeMoE-50M), large (TimeMoE-200M)")
    p.add_argument("--init", metavar="DIR", help="fine-tune from this forecaster (a moekit run or a Time-MoE HF directory)")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_date_options(p)
    p.set_defaults(handler=_train)

    p = sub.add_parser("forecast", help="forecast every numeric channel of a CSV past its end")
    p.add_argument("--model", metavar="DIR", help="a moekit forecaster run or a Time-MoE HF directory "
                   "(default: the pretrained forecaster that ships with moekit)")
    p.add_argument("--csv", required=True, metavar="FILE", help="history: a date column plus numeric channels")
    p.add_argument("--horizon", required=True, type=int, metavar="H", help="steps to forecast")
    p.add_argument("--context", type=int, metavar="L", help="history points per channel (default: up to 512)")
    p.add_argument("--out", required=True, metavar="FILE", help="forecast CSV to write (timestamps continue the file's)")
    p.add_argument("--plot", metavar="PNG", help="also write a plot of history and forecast")
    _add_date_options(p)
    p.set_defaults(handler=_forecast)

    p = sub.add_parser("eval-forecast", help="MSE/MAE on a CSV's test split, next to last-value, seasonal-naive and DLinear")
    p.add_argument("--model", metavar="DIR", help="a moekit forecaster run or a Time-MoE HF directory "
                   "(default: the pretrained forecaster that ships with moekit)")
    p.add_argument("--csv", required=True, metavar="FILE", help="the series (ETTh*/ETTm* splits by name, else 70/10/20)")
    p.add_argument("--horizons", default="96,192,336,720", help="comma-separated horizons (default 96,192,336,720)")
    p.add_argument("--stride", type=int, default=1, help="steps between test windows (default 1, the standard protocol)")
    p.add_argument("--context", type=int, default=512, help="context length for every method (default 512)")
    p.add_argument("--no-baselines", action="store_true", help="score the model only")
    p.add_argument("--out", metavar="JSON", help="also write the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_date_options(p)
    p.set_defaults(handler=_eval)
    add_pretrain_parser(sub)


def _pretrain(args) -> int:
    from pathlib import Path

    from ..train.pretrain_forecaster import check_data_dir, pretrain_forecaster
    from .paths import out_dir

    out_dir(args.out)
    exclude = [e for e in (args.exclude or "").split(",") if e]
    data_dir = args.data_dir
    if data_dir is None and Path(DEFAULT_DATA_DIR).is_dir():
        data_dir = DEFAULT_DATA_DIR
    with _plain_warnings("pretrain-forecaster"):
        data_dir = None if args.resume else check_data_dir(data_dir, exclude)
        summary = pretrain_forecaster(args.out, data_dir, exclude, args.overrides, dense=args.dense,
                                      resume=args.resume, progress=not args.quiet, corpus_file=args.corpus)
    result = summary["result"]
    if result.interrupted:
        print(f"interrupted at step {result.step}; saved {result.checkpoint} (continue with --resume)")
        return 130
    corpus = summary["corpus"]
    print(f"corpus: {sum(corpus.values()):,} points from {len(corpus) - 1} real datasets + KernelSynth "
          f"({corpus['synthetic']:,} points); built in {summary['corpus_seconds'] / 60:.1f} min")
    print(f"parameters: {summary['parameters']:,} total, {summary['active_parameters']:,} active per time point")
    if result.last_eval:
        print(f"validation Huber loss {result.last_eval['val_huber']:.4f}")
    if summary["table"] is not None:
        print(f"quantiles {summary['table'].levels} calibrated on {summary['table'].windows:,} validation windows")
    print(f"took {summary['seconds'] / 60:.1f} min on this machine; Time-MoE layout: {Path(args.out) / 'hf'}")
    return 0


DEFAULT_DATA_DIR = "../shared/data/timeseries"


def add_pretrain_parser(sub) -> None:
    p = sub.add_parser("pretrain-forecaster",
                       help="build the forecasting corpus (real + KernelSynth + TSMixup) and pretrain a forecaster")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.steps=600 train.lr=0.002 corpus.synthetic=400 model.num_layers=2")
    p.add_argument("--out", required=True, help="run directory (corpus, checkpoints, metrics, hf/ in Time-MoE's layout)")
    p.add_argument("--data-dir", metavar="DIR",
                   help=f"directory of ETTh1/ETTh2/ETTm1.csv (default {DEFAULT_DATA_DIR} when it exists)")
    p.add_argument("--exclude", metavar="NAMES", help="datasets to leave out, comma-separated, e.g. ETTm1,ETTh1")
    p.add_argument("--corpus", metavar="NPZ", help="reuse the corpus.npz another run built (same exclusions or fewer)")
    p.add_argument("--dense", action="store_true",
                   help="the dense baseline of equal active parameters instead of the MoE")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_pretrain)

    p = sub.add_parser("export-forecaster", help="write a forecaster in Time-MoE's Hugging Face layout "
                       "(config.json + model.safetensors + quantiles.json)")
    p.add_argument("--model", metavar="DIR", help="a moekit forecaster run or a Time-MoE HF directory "
                   "(default: the forecaster that ships with moekit)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.set_defaults(handler=_export)


def _export(args) -> int:
    from ..hf.timemoe import load_forecaster, save_hf
    from ..infer.forecast import quantile_table
    from .paths import out_dir, written

    out_dir(args.out)
    model, table = load_forecaster(args.model), quantile_table(args.model)
    with written(args.out):
        save_hf(model, args.out)
        if table is not None:
            table.save(args.out)
    print(f"wrote {args.out} (Time-MoE layout{', with quantiles.json' if table is not None else ''})")
    return 0
