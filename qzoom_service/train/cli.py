"""`qzoom train rpn-labels | rpn | calibrate-roi | gate-labels | gate`: the training pipeline from the command line.

Mounted under the main `qzoom` parser by `add_train_subcommands(subparsers)`; each leaf sets
`func(args) -> int` like the other `qzoom` commands.

    qzoom train rpn-labels --model M --data data.jsonl --out labels/      # stage-1 teacher maps
    qzoom train rpn --model M --data labels/ --out runs/rpn               # -> runs/rpn/model
    qzoom train calibrate-roi --model runs/rpn/model --data held_out.jsonl --write-config  # its RoI threshold
    qzoom train gate-labels --model runs/rpn/model --data data.jsonl --out ladders/ --resolutions 64 128 256 576
    qzoom train gate --model runs/rpn/model --data ladders/ --out runs/gate  # -> runs/gate/model
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import InvalidInput

__all__ = ["add_train_subcommands"]

log = logging.getLogger("qzoom.train")


def _common(p: argparse.ArgumentParser, data_help: str) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout) or hub id")
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help="output directory (written atomically / resumably)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the frozen model; trained branches keep float32 master weights")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="use only the first N records / samples")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _optim(p: argparse.ArgumentParser) -> None:
    p.add_argument("--K", type=int, help="branch layer (trunk layers 0..K-1 frozen); default: checkpoint, "
                                         "paper table (3B 24, 7B 18) or round(0.64 L)")
    p.add_argument("--T", type=int, help="branch depth; default: checkpoint, 3, or what fits")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=128, help="samples per optimizer step (default 128)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 (scripts 0.999, README 0.98)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="max grad norm (0 = off)")
    p.add_argument("--save-every", type=int, default=0, help="resumable checkpoint every N steps (0 = none)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-init-from-trunk", action="store_true",
                   help="start from the checkpoint's own branch instead of copying base layers K..K+T-1")


def add_train_subcommands(subparsers) -> argparse.ArgumentParser:
    """Add `train` with its four sub-commands to an argparse sub-parser collection; returns `train`."""
    train = subparsers.add_parser("train", help="train the SD-RPN (stage 1) and gate (stage 3) branches")
    sub = train.add_subparsers(dest="train_command", required=True)

    labels = sub.add_parser("rpn-labels", help="stage 1: the model's own answer-to-image attention maps",
                            description="Stage 1 teacher maps. When the data's rows carry `target_box`, the "
                                        "report also says how well the teacher localises (`teacher`: the share of "
                                        "attention peaks, and of tri-state foregrounds, on the box's grid cells, "
                                        "and the chance rate).")
    _common(labels, "JSONL dataset (image, question, answer)")
    labels.add_argument("--heads", help="grounding heads 'layer:h,h;layer:h' (default: paper table or heuristic)")
    labels.add_argument("--sink-heads", help="sink heads, same syntax (default: paper table or none)")
    labels.add_argument("--mode", choices=["textual", "natural"], default="textual")
    labels.add_argument("--no-short-prompt", action="store_true", help="textual: drop the short-answer suffix")
    labels.add_argument("--token-budget", type=int, default=576, help="image tokens (min = max pixels)")
    labels.add_argument("--no-square-pad", action="store_true", help="do not pad images to a square")
    labels.add_argument("--max-new-tokens", type=int, default=128)
    labels.add_argument("--answer-source", choices=["generate", "dataset"], default="generate")
    labels.set_defaults(func=cmd_rpn_labels)

    rpn = sub.add_parser("rpn", help="stage 1: train the SD-RPN twig branch")
    _common(rpn, "pseudo-label directory (from rpn-labels) or a JSONL dataset with target_box")
    rpn.add_argument("--labels", choices=["auto", "pseudo", "boxes"], default="auto",
                     help="auto: a directory is pseudo labels, a .jsonl file is ground-truth boxes")
    rpn.add_argument("--fg-ratio", type=float, default=0.25)
    rpn.add_argument("--bg-ratio", type=float, default=0.05)
    rpn.add_argument("--sink-thresh", type=float, default=1e-2)
    rpn.add_argument("--max-box-frac", type=float, default=0.5)
    rpn.add_argument("--min-peak", type=float, default=5e-3)
    rpn.add_argument("--blur", type=int, choices=[0, 3], default=3)
    rpn.add_argument("--token-budget", type=int, default=576, help="boxes mode: image tokens")
    rpn.add_argument("--no-square-pad", action="store_true", help="boxes mode: do not pad images to a square")
    rpn.add_argument("--touched-cells", choices=["ignore", "foreground"], default="ignore",
                     help="boxes mode: label for cells a box overlaps without holding its centre")
    rpn.add_argument("--pos-weight", type=float, default=1.0,
                     help="weight of foreground cells in the BCE (1 = the reference; >1 for targets of 1-2 cells)")
    _optim(rpn)
    rpn.set_defaults(func=cmd_rpn)

    calibrate = sub.add_parser(
        "calibrate-roi", help="after stage 1: choose the RoI threshold on held-out boxes",
        description="Route every held-out question through the SD-RPN with the zoom forced and, for each "
                    "threshold, count the questions whose RoI box contains the row's `target_box`. The chosen "
                    "threshold is the highest (tightest boxes) whose hit rate is within --tolerance of the best. "
                    "Prints the table and a JSON line; --out keeps them, --write-config makes the threshold "
                    "the checkpoint's serving default (`roi_thresh` in MODEL/config.json).")
    calibrate.add_argument("--model", required=True, help="checkpoint directory with a trained SD-RPN")
    calibrate.add_argument("--data", required=True,
                           help="held-out JSONL dataset; every row needs target_box [x1, y1, x2, y2] (pixels)")
    calibrate.add_argument("--token-budget", type=int,
                           help="coarse image tokens (min = max); default: the checkpoint's coarse budget")
    calibrate.add_argument("--thresholds", type=float, nargs="+",
                           help="RoI thresholds to try (default: train.calibrate.ROI_THRESHOLDS, 0.05 to 0.5)")
    calibrate.add_argument("--tolerance", type=float, default=0.02,
                           help="how far below the best hit rate (a fraction) a threshold may score and still be "
                                "chosen for its tighter boxes (default 0.02)")
    calibrate.add_argument("--out", help="write {roi_threshold, table} as JSON to this file")
    calibrate.add_argument("--write-config", action="store_true",
                           help="set the chosen threshold as roi_thresh in MODEL/config.json (a local directory)")
    calibrate.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    calibrate.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    calibrate.add_argument("--limit", type=int, help="use only the first N records")
    calibrate.add_argument("--quiet", action="store_true", help="no progress bar")
    calibrate.set_defaults(func=cmd_calibrate_roi)

    ladders = sub.add_parser("gate-labels", help="stage 3: answers across an ascending resolution ladder")
    _common(ladders, "JSONL dataset (image, question, answer = ground truth)")
    ladders.add_argument("--resolutions", type=int, nargs="+", required=True,
                         help="ascending image-token counts, e.g. 64 128 256 384 576 768 1024")
    ladders.add_argument("--prompt-suffix", default="", help="appended to each question (\\n escapes allowed)")
    ladders.add_argument("--max-new-tokens", type=int, default=16)
    ladders.add_argument("--zoom-top", type=int, default=0,
                         help="answer the highest N rungs through the zoom route (needs a trained SD-RPN; "
                              "for models that read fine detail only when zoomed)")
    ladders.set_defaults(func=cmd_gate_labels)

    gate = sub.add_parser("gate", help="stage 3: train the gate branch")
    _common(gate, "ladder directory (from gate-labels)")
    gate.add_argument("--easy-ratio", type=float, default=1.0, help="easy samples kept per hard sample")
    gate.add_argument("--p-pos", type=float, default=0.9, help="hard samples: probability of a positive draw")
    gate.add_argument("--max-samples", type=int, help="keep this many after a seeded shuffle")
    gate.add_argument("--gate-threshold", type=float,
                      help="high_res_thresh written to config.json (default: from the held-out table, the middle "
                           "of the thresholds tied at the best accuracy; with --holdout 0, the checkpoint's or 0.1)")
    gate.add_argument("--holdout", type=float, default=0.1,
                      help="fraction of the filtered pool held out for the precision/recall table (0 = none)")
    _optim(gate)
    gate.set_defaults(func=cmd_gate)
    return train


def _load(args):
    from ..model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)


def _records(args, tokenizer):
    from .data import load_records

    records = load_records(args.data, tokenizer=tokenizer)
    return records[: args.limit] if args.limit else records


def _config(args):
    from .loop import TrainConfig

    return TrainConfig(lr=args.lr, batch_size=args.batch_size, epochs=args.epochs, steps=args.steps,
                       warmup=args.warmup, betas=(0.9, args.beta2), weight_decay=args.weight_decay, clip=args.clip,
                       seed=args.seed, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints)


def _report(result) -> None:
    last = next((loss for _, loss in reversed(result.losses) if loss is not None), None)
    print(json.dumps({"model": str(result.model_dir), "role": result.role, "K": result.K, "T": result.T,
                      "steps": result.total_steps, "resumed_at": result.start_step, "final_loss": last}))


def cmd_rpn_labels(args) -> int:
    from .calibrate import target_boxes, teacher_hit_rate
    from .rpn_labels import HeadSet, default_heads, make_pseudo_labels, parse_heads, save_pseudo_labels

    loaded = _load(args)
    text = loaded.model.config.text_config
    heads = default_heads(text.num_hidden_layers, text.num_attention_heads, args.mode)
    if args.heads is not None or args.sink_heads is not None:
        n, h = text.num_hidden_layers, text.num_attention_heads
        heads = HeadSet(parse_heads(args.heads, n, h) if args.heads is not None else heads.grounding,
                        parse_heads(args.sink_heads, n, h) if args.sink_heads is not None else heads.sink)
    if not heads.grounding:
        raise InvalidInput("--heads selects no grounding head")
    records = _records(args, loaded.processor.tokenizer)
    labels = make_pseudo_labels(loaded, records, heads=heads, mode=args.mode,
                                short_prompt=not args.no_short_prompt, token_budget=args.token_budget,
                                pad_square=not args.no_square_pad, max_new_tokens=args.max_new_tokens,
                                answer_source=args.answer_source, progress=not args.quiet)
    out = save_pseudo_labels(labels, args.out)
    report = {"labels": str(out), "samples": len(labels.samples), "dropped": labels.dropped}
    boxes = target_boxes(records)
    if boxes:
        report["teacher"] = teacher_hit_rate(labels, boxes)
    print(json.dumps(report))
    return 0


def cmd_rpn(args) -> int:
    from .rpn_labels import load_pseudo_labels, rpn_samples_from_boxes, rpn_samples_from_pseudo
    from .train_heads import train_rpn

    source = args.labels
    if source == "auto":
        source = "pseudo" if Path(args.data).is_dir() else "boxes"
    loaded = _load(args)
    if source == "pseudo":
        rules = dict(fg_ratio=args.fg_ratio, bg_ratio=args.bg_ratio, sink_thresh=args.sink_thresh,
                     max_box_frac=args.max_box_frac, min_peak=args.min_peak, blur=args.blur)
        samples, dropped = rpn_samples_from_pseudo(load_pseudo_labels(args.data), **rules)
        log.info("%d samples; %d dropped (all cells ignored: box too large or peak too weak)", len(samples), dropped)
    else:
        samples = rpn_samples_from_boxes(_records(args, loaded.processor.tokenizer), factor=loaded.factor,
                                         token_budget=args.token_budget,
                                         pad_square=not args.no_square_pad, touched=args.touched_cells)
    samples = samples[: args.limit] if args.limit else samples
    result = train_rpn(loaded, samples, _config(args), K=args.K, T=args.T,
                       init_from_trunk=not args.no_init_from_trunk, out_dir=args.out, resume=args.resume,
                       progress=not args.quiet, pos_weight=args.pos_weight)
    _report(result)
    return 0


def cmd_calibrate_roi(args) -> int:
    from ..engine import QZoomEngine
    from .calibrate import (ROI_THRESHOLDS, boxed_questions, calibrate_roi_threshold, roi_table_text,
                            write_serving_thresholds)

    if args.write_config and not (Path(args.model) / "config.json").is_file():
        raise InvalidInput(f"--write-config needs a local checkpoint directory; {args.model} has no config.json")
    records = _records(args, tokenizer=None)
    questions = boxed_questions(records)  # every box checked before the model loads
    engine = QZoomEngine(_load(args))
    pixels = args.token_budget * engine.loaded.factor**2 if args.token_budget is not None else None
    chosen, table = calibrate_roi_threshold(engine, questions, thresholds=args.thresholds or ROI_THRESHOLDS,
                                            tolerance=args.tolerance, min_pixels=pixels, max_pixels=pixels,
                                            progress=not args.quiet)
    print(roi_table_text(table))
    result = {"roi_threshold": chosen, "table": table}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.write_config:
        write_serving_thresholds(args.model, roi_threshold=chosen)
    print(json.dumps({"model": args.model, "samples": len(records), "written": args.write_config, **result}))
    return 0


def cmd_gate_labels(args) -> int:
    from .gate_labels import make_answer_ladders, save_ladders

    loaded = _load(args)
    suffix = args.prompt_suffix.encode().decode("unicode_escape")
    ladders = make_answer_ladders(loaded, _records(args, loaded.processor.tokenizer), args.resolutions,
                                  prompt_suffix=suffix, max_new_tokens=args.max_new_tokens, zoom_top=args.zoom_top,
                                  progress=not args.quiet)
    out = save_ladders(ladders, args.out)
    print(json.dumps({"ladders": str(out), "samples": len(ladders.ladders)}))
    return 0


def cmd_gate(args) -> int:
    from .calibrate import choose_gate_threshold, gate_table_text, write_serving_thresholds
    from .gate_labels import GateDataset, load_ladders
    from .train_heads import gate_calibration, train_gate

    if not 0.0 <= args.holdout < 1.0:
        raise InvalidInput(f"--holdout must be in [0, 1); got {args.holdout}")
    ladders = load_ladders(args.data)
    if args.limit:
        ladders.ladders = ladders.ladders[: args.limit]
    dataset = GateDataset.from_ladders(ladders, seed=args.seed, easy_ratio=args.easy_ratio,
                                       max_samples=args.max_samples, p_pos=args.p_pos)
    dataset, holdout = dataset.split(args.holdout)
    log.info("gate pool: %s; %d held out", dataset.stats, len(holdout.items))
    loaded = _load(args)
    result = train_gate(loaded, dataset, _config(args), K=args.K, T=args.T,
                        init_from_trunk=not args.no_init_from_trunk, out_dir=args.out, resume=args.resume,
                        progress=not args.quiet, gate_threshold=args.gate_threshold)
    if holdout.items:
        table = gate_calibration(loaded, holdout.draw(0), result.branches, dataset.prompt_suffix)
        (Path(args.out) / "calibration.json").write_text(json.dumps(table, indent=1))
        print(gate_table_text(table))
        if args.gate_threshold is None and any(row["accuracy"] is not None for row in table):
            chosen = choose_gate_threshold(table)
            write_serving_thresholds(result.model_dir, gate_threshold=chosen)
            print(f"gate threshold {chosen} (middle of the thresholds tied at the best held-out accuracy), "
                  f"written to {result.model_dir / 'config.json'}")
    _report(result)
    return 0
