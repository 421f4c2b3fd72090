"""`shrink quantize`: quantize a model's layers, print sizes before and after, save it."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import click

from ..core.errors import ShrinkError
from ..core.ownership import remove_own
from ..quant import output_layer_name, quantize
from ..quant.mixed import MixedPrecision
from ..quant.recipe import GPTQ, MAX_TUNE_STEPS, METHODS, QAD, ROTATED, ROTATED_ONLINE, Tune, parse_method
from ..quant.record import record_of, summary_line
from .common import FORCE, Number, calibration_windows, config_option, console, field_help, main, mb, size_table


def _parse_layers(items: tuple[str, ...]) -> dict:
    mapping = {}
    for item in items:
        if "=" not in item:
            raise ShrinkError(f"--layer {item!r}: expected GLOB=FORMAT, e.g. 'model.layers.0.*=int8' or 'lm_head=none'")
        glob, fmt = item.rsplit("=", 1)
        mapping[glob.strip()] = None if fmt.strip().lower() in ("none", "fp32", "keep") else fmt.strip()
    return mapping


@main.command("quantize")
@click.argument("model", default="default")
@click.option("--format", "-f", "fmt", default="int4-g64", show_default=True,
              help="Format for every Linear layer: int8, int6, int5, int4, int3 or int2, each with -gN (N in "
                   "16/32/64/128; omit for per-channel), optional -asym; iq4nl-gN (llama.cpp's IQ4_NL levels); "
                   "q2k/q3k/q4k/q5k/q6k (llama.cpp's K-quants: integer group scales times an fp16 scale per 256 inputs; "
                   "layers whose inputs are not multiples of 256 get llama.cpp's fallback, e.g. q4k -> int5-g32); "
                   "q4k-m, q4k-s, q5k-m, q5k-s, q3k-s/m/l, q2k-m (llama.cpp's Q4_K_M ... Q2_K mixes of those, output layer "
                   "included); or "
                   "bf16/fp16. int4/int5/int8/iq4nl in groups of 32 or more and the K-quants export to GGUF exactly "
                   "(Q4_0/Q5_0/Q8_0/IQ4_NL/Q2_K../Q6_K, -asym Q4_1/Q5_1).")
@click.option("--layer", "layers", multiple=True, metavar="GLOB=FORMAT",
              help="Per-layer override, first match wins; FORMAT 'none' keeps full precision. Repeatable.")
@click.option("--method", type=click.Choice([*METHODS, *ROTATED, *ROTATED_ONLINE]), default="rtn", show_default=True,
              help="rtn: round to nearest (no data); gptq: error-compensating GPTQ; awq: activation-aware scaling "
                   "and clipping; awq+gptq: scaling, then GPTQ. All but rtn need --calibration. rotate+...: first "
                   "rotate the residual stream and attention values by Hadamard matrices folded into the weights "
                   "(Llama-shaped models, in memory; 'rotate' alone: then rtn). rotate-online+...: the same, and each "
                   "MLP down projection's input rotated as the model runs (less error at 3-4 bits; only shrink runs "
                   "the result: no GGUF export, no transformers loading).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration text: a .txt file, or .jsonl with a \"text\" (or \"input\") field per line. "
                   "Keep it apart from the text you evaluate on.")
@calibration_windows(quantize, "Calibration windows to use.")
@click.option("--target-bits", type=Number(2.5, 16), default=None,
              help="Mixed precision: choose a format per layer (int2-g32, int3-g32, int4-g64, int4-g32, int8) so the quantized layers "
                   "average at most this many bits per weight, the most sensitive kept wider. Needs --calibration.")
@config_option(GPTQ, "act_order", "--act-order/--no-act-order")
@config_option(GPTQ, "damp", type=Number(0, 1, lo_open=True))
@config_option(GPTQ, "true_sequential", "--true-sequential/--no-true-sequential")
@config_option(GPTQ, "refit", "--refit/--no-refit")
@click.option("--tune-steps", default=0, show_default=True, type=Number(0, MAX_TUNE_STEPS, integer=True),
              help=field_help(Tune, "steps") + " A good value: 32.")
@click.option("--qad", "qad_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Quantization-aware distillation after the method: train the quantized model's scales and norms "
                   "(codes fixed) end to end against the original's outputs on this text (.txt or .jsonl, windows as "
                   "--samples/--seq-len), an eighth held out; kept only if its KL went down. Trained a block at "
                   "a time where the whole graph would not fit; a folder with --out streams (the original's "
                   "outputs read from its shards, the folder written then trained).")
@click.option("--qad-steps", default=0, show_default=True, type=Number(0, 10**7, integer=True),
              help="QAD: training steps, one window each (with neither this nor --qad-time: 100).")
@click.option("--qad-time", default=None, metavar="DURATION",
              help="QAD: time budget, e.g. 90s, 20m, 1.5h (with --qad-steps too: whichever ends first).")
@click.option("--qad-codes-lr", default=0.0, show_default=True, type=float,
              help="QAD: " + field_help(QAD, "codes_lr").removeprefix("QAD: "))
@click.option("--resume", is_flag=True,
              help="QAD: continue from the checkpoint OUT.qad-checkpoint an interrupted run left (written every minute "
                   "and on Ctrl-C; the steps before QAD run again and must give the same model, checked).")
@click.option("--quantize-output", is_flag=True, help="Also quantize the output layer (kept in full precision by default).")
@click.option("--all-experts", is_flag=True,
              help="Mixtures of experts: calibrate every expert on every token (statistics only; the outputs still "
                   "follow the routing). By default each expert sees the tokens routed to it, and one that sees none "
                   "is rounded to nearest, said so.")
@click.option("--stream/--no-stream", default=None,
              help="Quantize a Hugging Face folder block by block from its safetensors shards, so memory holds about "
                   "one block, not the model (default: whenever the folder and options allow; --stream says why not "
                   "when they do not).")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Save the quantized model and results.json to this folder (written atomically); it must be new "
                   "or empty, or with --force a model shrink saved there.")
@FORCE


def quantize_command(model, fmt, layers, method, calibration, samples, seq_len, target_bits, act_order, damp, true_sequential, refit,
             tune_steps, qad_file, qad_steps, qad_time, qad_codes_lr, resume, quantize_output, all_experts, stream, out, force):
    """Quantize MODEL's Linear layers and print sizes before and after.

    MODEL defaults to the built-in SmolLM2-135M-Instruct.
    Embeddings and the output layer stay in full precision unless asked. A Hugging Face folder is quantized
    block by block from its weights files (see --stream), with its estimated peak memory printed first.
    Under `torchrun --nproc-per-node N $(which shrink) quantize ...` the calibration windows are shared
    among N processes and their statistics combined (same result as one process); the first writes. With --out, writes
    model.safetensors, shrink.json, config and tokenizer, and results.json.
    """
    from ..quant import parse_format
    from ..quant.distributed import join
    from ..quant.kmix import is_mix

    if not is_mix(fmt):
        parse_format(fmt)  # fail on bad options before loading anything
    elif layers:
        raise ShrinkError(f"--format {fmt} is llama.cpp's mix, a format for every layer; --layer cannot change it "
                          "(give --format q4k and --layer rules instead)")
    rank, processes = join()  # under torchrun: the calibration windows shared among the processes
    if rank:
        console.quiet = True  # one process speaks and writes
        out = None
    elif processes > 1:
        console.print(f"{processes} processes share the calibration windows (torchrun); this one writes the output")
    base = parse_method(method).method  # (rotate+gptq: gptq)
    if (base != "rtn" or target_bits is not None) and calibration is None:
        raise ShrinkError(f"--method {method}{' --target-bits' if target_bits else ''} needs --calibration FILE")
    if calibration is not None and not calibration.is_file():
        raise ShrinkError(f"{calibration}: calibration file not found")
    if calibration is not None and base == "rtn" and target_bits is None:
        raise ShrinkError("--calibration is used by --method gptq/awq/awq+gptq or --target-bits; rtn needs none")
    if all_experts and calibration is None:
        raise ShrinkError("--all-experts is about calibration: use it with a calibrated method and --calibration FILE")
    if tune_steps and calibration is None:
        raise ShrinkError("--tune-steps needs a calibrated method (--method gptq/awq/awq+gptq or --target-bits) "
                          "and --calibration FILE")
    if (true_sequential or not refit) and not base.endswith("gptq"):
        raise ShrinkError("--true-sequential and --no-refit are GPTQ's options: use them with --method gptq or awq+gptq")
    fmt_given = click.get_current_context().get_parameter_source("fmt") is not click.core.ParameterSource.DEFAULT
    spec = _parse_layers(layers) if layers else fmt
    if layers and "*" in spec and fmt_given and spec["*"] != fmt:
        raise ShrinkError(f"--layer '*={spec['*'] or 'none'}' and --format {fmt} both set the format of every layer; "
                          "give one of them")
    if layers:
        spec.setdefault("*", fmt)  # the layers no glob names: --format (its default unless given)
    if target_bits is not None:
        if fmt_given:
            raise ShrinkError("--target-bits chooses a format per layer; leave out --format (--layer GLOB=none "
                              "keeps layers in full precision)")
        spec = MixedPrecision(target_bits, base=spec if layers else None)
    from contextlib import nullcontext

    from ..core.outdir import claim
    from ..io import is_own_folder, read_model, save

    recipe = parse_method(method, damp=damp, act_order=act_order, tune_steps=tune_steps,
                          true_sequential=true_sequential, refit=refit)
    recipe = _with_qad(recipe, qad_file, qad_steps, qad_time, qad_codes_lr)
    qad_checkpoint = _qad_checkpoint(out, recipe, resume)
    whole = ("a rotation (--method rotate+...) needs the whole model in memory" if recipe.rotate is not None else
             "--qad without --out trains the model in memory (block by block, it trains the folder written)"
             if recipe.qad is not None and out is None else None)
    streamed = _stream_or_not(model, stream, spec, quantize_output, whole)
    with claim(out, "quantize", owned=is_own_folder, force=force) if out is not None else nullcontext():
        t0 = time.perf_counter()
        seconds = {}
        if streamed:
            from ..entrypoints.streamed import quantize_streamed

            console.print(f"quantizing {model} block by block from its weights files (--no-stream loads it whole)")
            def results(m, estimate):  # written into the folder before it is sealed
                return {**_results(m, model, fmt, layers, method, target_bits, record_of(m).source,
                                   {"quantize": time.perf_counter() - t0}), "memory_estimate": estimate.to_dict()}

            loaded = quantize_streamed(model, out, spec, method=recipe, keep_output=not quantize_output, force=force,
                                       all_experts=all_experts,
                                       results=results, calibration=calibration, n_samples=samples, seq_len=seq_len,
                                       say=console.print, qad_data=qad_file, qad_checkpoint=qad_checkpoint,
                                       qad_resume=resume)
            seconds["quantize"] = time.perf_counter() - t0
        else:
            with console.status("loading model"):
                loaded = read_model(model)
            seconds["load"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            calib_kw = {}
            if calibration is not None:
                calib_kw = dict(calibration=calibration, tokenizer=loaded.tokenizer, n_samples=samples, seq_len=seq_len)
            if qad_file is not None:
                calib_kw.update(qad_data=qad_file, tokenizer=loaded.tokenizer, n_samples=samples, seq_len=seq_len,
                                qad_checkpoint=qad_checkpoint, qad_resume=resume)
            quantize(loaded.model, spec, method=recipe, keep_output=not quantize_output, all_experts=all_experts,
                     **calib_kw)
            seconds["quantize"] = time.perf_counter() - t1
        _print_summary(loaded, model, fmt, method, target_bits, seconds)
        if out is not None and not streamed:
            save(loaded.model, out, tokenizer=loaded.tokenizer, source=loaded.source, force=force,
                 results=_results(loaded.model, model, fmt, layers, method, target_bits, loaded.source, seconds))
        if qad_checkpoint is not None:
            remove_own(qad_checkpoint)  # the model it was for is saved
        if out is not None:
            console.print(f"saved to {out} (load it with shrink.load({str(out)!r}); see `shrink inspect {out}`)")
    if processes > 1:
        from ..quant.distributed import leave

        leave()


def _with_qad(recipe, qad_file, steps: int, duration: str | None, codes_lr: float = 0.0):
    """The recipe with a QAD step when --qad is given (its budget: --qad-steps and --qad-time, else 100
    steps; codes trained at `codes_lr` when above 0); ShrinkError for the QAD options without --qad, a
    missing file or a bad duration."""
    from dataclasses import replace

    from ..quant import QAD
    from ..quant.qad import parse_seconds

    if qad_file is None:
        if steps or duration or codes_lr:
            raise ShrinkError("--qad-steps, --qad-time and --qad-codes-lr set --qad FILE's training: give the file too")
        return recipe
    if not qad_file.is_file():
        raise ShrinkError(f"{qad_file}: QAD text file not found")
    try:
        seconds = parse_seconds(duration) if duration is not None else None
    except ValueError as e:
        raise ShrinkError(f"--qad-time {e}") from None
    return replace(recipe, qad=QAD(steps=steps or (0 if seconds else 100), seconds=seconds, codes_lr=codes_lr))


def _qad_checkpoint(out: Path | None, recipe, resume: bool) -> Path | None:
    """Where QAD keeps its training state: OUT.qad-checkpoint beside the output folder (None without QAD or
    --out); ShrinkError for --resume without QAD or --out, or with nothing to resume."""
    if recipe.qad is None or out is None:
        if resume:
            raise ShrinkError("--resume continues an interrupted QAD (--qad FILE) into --out: give both")
        return None
    folder = Path(f"{out}.qad-checkpoint")
    if resume and not folder.is_dir():
        raise ShrinkError(f"--resume: {folder} does not exist; nothing to resume (run without --resume)")
    return folder


def _stream_or_not(model: str, stream: bool | None, spec, quantize_output: bool, whole: str | None = None) -> bool:
    """Whether to quantize block by block from disk: asked (--stream: refused with the reason when the
    folder or options do not allow it), refused (--no-stream), or by default whenever they allow it.
    whole: why the job needs the whole model in memory (default None: it does not)."""
    if stream is False:
        return False
    from ..entrypoints.streamed import why_not_streamed

    why = why_not_streamed(model, spec, keep_output=not quantize_output) if model != "default" else \
        "the built-in model is a GGUF file"
    if why is None and whole:
        why = whole
    if why is not None and stream:
        raise ShrinkError(f"--stream: cannot quantize {model} block by block: {why}")
    return why is None


def _results(qmodel, model, fmt, layers, method, target_bits, source, seconds) -> dict:
    """results.json of a quantize run."""
    from ..quant import quantized_bits_per_weight, size_rows

    done = record_of(qmodel)
    rows = size_rows(qmodel, output_name=output_layer_name(qmodel))
    return {"command": "quantize", "model": str(model), "source": source, "format": fmt,
            "layers": dict(_parse_layers(layers)), "method": method,
            "quantized_bits_per_weight": quantized_bits_per_weight(qmodel), "target_bits": target_bits,
            "formats": done.formats, "calibration": done.calibration, "sizes": [r.to_dict() for r in rows],
            "kept_full_precision": [n for n, f in done.formats.items() if f is None], "seconds": dict(seconds),
            "check": done.check.to_dict() if done.check is not None else None,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # so far: the folder is written next


def _print_summary(loaded, model, fmt, method, target_bits, seconds) -> None:
    """What quantize did: calibration, warnings, the size table, the forward check, formats, bits."""
    from ..quant import parse_format, quantized_bits_per_weight, size_rows

    done = record_of(loaded.model)
    record = done.calibration
    if record:
        d = record["data"]
        console.print(f"calibration: {d.get('samples')} x {d.get('seq_len')} tokens from {d.get('source')}")
        tuned = [v for v in record.get("layers", {}).values() if v.get("tune_error_before")]
        if tuned:
            ratio = sum(v["tune_error_after"] / v["tune_error_before"] for v in tuned) / len(tuned)
            console.print(f"tuning ({record['tune_steps']} steps per block): block output error "
                          f"{100 * (1 - ratio):.0f}% lower on average over {len(tuned)} blocks")
        for w in record.get("warnings", []):
            console.print(f"[yellow]warning[/yellow]: {w}")
    applied = summary_line(done.layers, method)
    if applied:
        console.print(f"[yellow]{applied}[/yellow]")
    rows = size_rows(loaded.model, output_name=output_layer_name(loaded.model))
    title_fmt = f"mixed, {target_bits} bits/weight" if target_bits else fmt
    console.print(size_table(rows, f"{loaded.source.get('name') or model} -> {title_fmt} ({method})"))
    check = done.check
    if check is not None:
        console.print(check.line() if check.skipped is None else f"[yellow]{check.line()}[/yellow]")
    if target_bits is not None:
        by_format: dict[str, list[str]] = {}
        for n, f in done.formats.items():
            if f is not None:
                by_format.setdefault(f, []).append(n)
        for f, names in sorted(by_format.items(), key=lambda kv: -parse_format(kv[0]).bits):
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} layers)" if len(names) > 8 else "")
            console.print(f"{f}: {shown}")
    kept = [n for n, f in done.formats.items() if f is None]
    if kept:
        console.print(f"kept in full precision: {', '.join(kept[:6])}{' ...' if len(kept) > 6 else ''}"
                      " (and all embeddings)")
    total = rows[-1]
    bpw = quantized_bits_per_weight(loaded.model)
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items())
    console.print(f"quantized layers: {bpw:.3f} bits/weight; model {mb(total.bytes_fp32)} MB -> {mb(total.bytes_now)} MB "
                  f"({total.bytes_fp32 / max(total.bytes_now, 1):.2f}x smaller); {timing}")
