"""The ``visor`` command. Sub-commands import their heavy dependencies lazily, so ``visor --help`` is fast."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from .commands.args import add_data_build_args, add_workload_args, grid, positive
from .commands.json_out import emit, stdout_for_json
from .errors import report
from .quiet import quiet_third_party


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visor",
        description="VISOR-Lightning: VISion On Request vision-language models (CVPR 2026) on PyTorch Lightning.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser(
        "flops",
        help="analytic prefill/decode FLOPs and visual-KV bytes of every feasible configuration vs dense",
        description="The formula is documented in visor_lightning/flops.py and docs/flops.md.",
    )
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="experiment YAML: a model: section (backbone, schedule), or a stage config / "
                                      "run's config.yaml (its run's weights, init_from, or backbone)")
    src.add_argument("--weights", metavar="DIR", help="a stage's weights/ directory: the model it saved")
    f.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    add_workload_args(f)

    for name, text in (("fit", "train one stage: visor fit --config experiments/...yaml (LightningCLI; --help there)"),
                       ("validate", "evaluate a stage's model on its validation sets (LightningCLI)"),
                       ("test", "evaluate on the test loaders (LightningCLI)"),
                       ("pipeline", "all stages in order, weights handed over: visor pipeline --config experiments/debug/pipeline.yaml"),
                       ("eval", "accuracy + FLOPs per eval set for every configuration and the policy: visor eval --config X --ckpt C"),
                       ("ask", "one image + one question: the answer, the configuration chosen, its predicted correctness, FLOPs vs dense"),
                       ("realsize", "the real 0.5B recipe at real shapes on this machine: every stage 2 steps, "
                                    "bf16-mixed, ZeRO-2, memory vs visor sizing (docs/scale.md)"),
                       ("submit", "one stage as a requeueable Slurm job: visor submit --config X --nodes N --gpus-per-node G"),
                       ("config-reference", "print (or --write) docs/config.md, generated from the typed signatures")):
        sub.add_parser(name, help=text, add_help=False)
    _add_data_parsers(sub)
    _add_bench_parsers(sub)
    z = sub.add_parser("sizing", help="step time and GPU memory under ZeRO-2 for LLaVA-OV 0.5B/1.5B/7B on 8-64 GPUs "
                                      "(from the FLOPs model; assumptions printed)")
    z.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    z.add_argument("--weights", default=None, metavar="DIR",
                   help="instead of the GPU table: peak host memory of training the model in this weights/ directory "
                        "on CPU (the setup `visor realsize` measures; assumptions printed)")
    z.add_argument("--trainable", type=positive, default=None,
                   help="with --weights: trained parameters (default: all of them, a full fine-tune)")
    z.add_argument("--world", type=positive, default=1, help="with --weights: processes (DDP or ZeRO-2 ranks)")
    z.add_argument("--zero2", action="store_true", help="with --weights: DeepSpeed ZeRO-2 (bf16 parameters)")
    z.add_argument("--image", default="384x384", metavar="HxW", help="with --weights: image height x width (default 384x384)")
    z.add_argument("--text-tokens", type=positive, default=64, help="with --weights: text tokens per sample (default 64)")
    z.add_argument("--batch", type=positive, default=1, help="with --weights: samples per process (default 1)")

    u = sub.add_parser("ui", help="serve the MLflow store (runs/mlflow.db or MLFLOW_TRACKING_URI) on 127.0.0.1 only",
                       description="Runs `mlflow server` on the loopback interface; reach it from elsewhere with an "
                                   "SSH tunnel (ssh -L 5000:127.0.0.1:5000 host), never by opening the port.")
    u.add_argument("--port", type=positive, default=5000, help="port on 127.0.0.1 (default 5000)")
    u.add_argument("--store", default=None, help="backend store URI (default: the one visor logs to)")
    y = sub.add_parser("mlflow-sync", help="send a run's mlflow_unsent.jsonl (kept while the server was down) into its run")
    y.add_argument("run_dir", help="the stage's run directory (holds mlflow_run_id and mlflow_unsent.jsonl)")
    d = sub.add_parser(
        "demo",
        help="tiny end-to-end run on CPU: build + load a LLaVA-OV checkpoint, VISOR forward/generate, FLOPs",
    )
    d.add_argument("--out", default="runs/model_demo", help="working directory (default runs/model_demo)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and the image order (default 0)")
    d.add_argument("--images", type=positive, default=8, help="easy-vqa images in the batch (default 8)")
    d.add_argument("--repeats", type=positive, default=7, help="timed repeats per configuration (median kept)")
    d.add_argument("--json", default=None, help="also write the results as JSON to this file")
    return parser


def _add_data_parsers(sub) -> None:
    data = sub.add_parser("data", help="build, check and tokenise WebDataset shards (LLaVA conversation format)")
    dsub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    b = dsub.add_parser(
        "build", help="write {split}-%%06d.tar shards + {split}-manifest.json from a source",
        description="Bad samples are skipped and counted per reason (listed in the manifest); --strict raises instead.",
    )
    add_data_build_args(b)
    t = dsub.add_parser("tokenizer", help="train a byte-level BPE tokenizer on shards (for from-scratch tiny models)")
    t.add_argument("--shards", nargs="+", required=True, help="shard globs/patterns/manifests to read text from")
    t.add_argument("--out", required=True, help="directory for the tokenizer files")
    t.add_argument("--vocab-size", type=positive, default=512, help="tokens, special ones included (default 512)")
    x = dsub.add_parser("export-hf", help="a built split as a Hugging Face datasets directory (for lmms-eval tasks; "
                                          "needs the eval extra)")
    x.add_argument("--dir", required=True, help="directory holding the shards and {split}-manifest.json")
    x.add_argument("--split", required=True, help="the split to export (its {split}-manifest.json)")
    x.add_argument("--out", required=True, help="datasets directory to write (save_to_disk)")
    x.add_argument("--hf-split", default="test", help="the split name inside it (default test)")
    v = dsub.add_parser("verify", help="re-read a split: sha256 per shard and read == written")
    v.add_argument("--dir", required=True, help="directory holding the shards and {split}-manifest.json")
    v.add_argument("--split", default="train", help="the split to check (default train)")
    v.add_argument("--json", action="store_true", help="print JSON")


def _add_bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks; ratios are measured within one run")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND", required=True)
    b = bsub.add_parser("data", help="loader samples/s (decode + collate) at several worker counts vs the training step rate")
    b.add_argument("--shards", nargs="+", required=True, help="shard globs/patterns/manifests")
    b.add_argument("--tokenizer", required=True, help="tokenizer directory (visor data tokenizer)")
    b.add_argument("--config", default="experiments/debug/tiny.yaml", help="experiment YAML whose model is trained")
    b.add_argument("--batch-size", type=positive, default=8, help="samples per batch (default 8)")
    b.add_argument("--batches", type=positive, default=24, help="batches timed per measurement")
    b.add_argument("--workers", default="0,1,2", help="comma-separated DataLoader worker counts")
    b.add_argument("--json", action="store_true", help="print JSON instead of a table")
    for kind, text in (("prefill", "LLM prefill time of dense vs every configuration: measured speed-up / analytic FLOPs ratio"),
                       ("decode", "decode time per token, tokens/s and visual-KV bytes of dense vs every configuration")):
        k = bsub.add_parser(kind, help=text, description=text + ". Random weights; CUDA when present.")
        k.add_argument("--config", default="experiments/llava_ov_0.5b/model.yaml",
                       help="experiment YAML with a model: section (default: the LLaVA-OV 0.5B shapes)")
        k.add_argument("--weights", metavar="DIR", default=None,
                       help="instead of --config: the shapes of a stage's weights/ directory (random weights are timed)")
        add_workload_args(k)
        k.add_argument("--batch", type=positive, default=1, help="sequences per call (default 1)")
        k.add_argument("--repeats", type=positive, default=5, help="timed rounds; the median is kept (default 5)")
        k.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
        k.add_argument("--fastv", type=positive, default=None, metavar="K",
                       help="also time FastV (prune after layer K) at each configuration's FLOPs")
        k.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when present)")
        k.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="default: bfloat16 on CUDA, float32 on CPU")
        k.add_argument("--profile", default=None, metavar="FILE|GPU",
                       help="device profile the predictions use (default: this machine's, measured once and cached)")
        k.add_argument("--json", action="store_true", help="print JSON instead of a table")
        k.add_argument("--out", default=None, help="also write the JSON to this file")
    p = bsub.add_parser("profile", help="measure this device's GEMM/SDPA throughput, bandwidth and op overhead (<= ~30 s)",
                        description="Measure (or, with --datasheet, assume) the device profile the cost model prices "
                                    "time with, and cache it per machine/device/dtype.")
    p.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--datasheet", default=None, metavar="GPU", help="write an assumed profile from vendor peaks: "
                   "h100-sxm, h200-sxm, a100-sxm-80gb")
    p.add_argument("--force", action="store_true", help="measure again even if a cached profile exists")
    p.add_argument("--out", default=None, help="write the profile here instead of the cache")
    p.add_argument("--json", action="store_true", help="print the profile JSON")
    sv = bsub.add_parser("serve", help="predicted TTFT, decode tokens/s at batch 1/32/128, KV and sequences that fit",
                         description="Predicted serving numbers per configuration on a device profile (nothing runs).")
    sv.add_argument("--config", default="experiments/llava_ov_0.5b/model.yaml", help="experiment YAML with a model: section")
    sv.add_argument("--profile", default="h100-sxm", metavar="FILE|GPU", help="profile file or datasheet GPU (default h100-sxm)")
    sv.add_argument("--grids", default="2x2,6x6", help="comma-separated AnyRes grids (default 2x2,6x6)")
    sv.add_argument("--text-tokens", type=positive, default=64, help="prompt text tokens (default 64)")
    sv.add_argument("--output-tokens", type=positive, default=256, help="generated tokens per request (default 256)")
    sv.add_argument("--memory-gb", type=float, default=None, help="device memory (default: the profile's)")
    sv.add_argument("--bytes-per-element", type=positive, default=2, help="weights and KV (default 2: bf16)")
    sv.add_argument("--token-pool", type=positive, default=None, help="VISOR-TR pooling factor (default: the config's)")
    sv.add_argument("--eager-decode", action="store_true",
                    help="price a launch per op in decode steps (default: steps replayed as CUDA graphs)")
    sv.add_argument("--json", action="store_true", help="print JSON instead of tables")
    tr = bsub.add_parser("train", help="one training step (fwd + bwd + AdamW): dense vs universal per configuration",
                         description="Time a full training step of dense full fine-tune and of the universal stage at "
                                     "each configuration, measured and predicted. Random weights; CUDA when present.")
    tr.add_argument("--config", default="experiments/llava_ov_0.5b/model.yaml", help="experiment YAML with a model: section")
    add_workload_args(tr)
    tr.set_defaults(grid=(1, 1))
    tr.add_argument("--batch", type=positive, default=1, help="sequences per step (default 1)")
    tr.add_argument("--repeats", type=positive, default=2, help="timed rounds (default 2)")
    tr.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    tr.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
    tr.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on CUDA, float32 on CPU")
    tr.add_argument("--profile", default=None, metavar="FILE|GPU", help="device profile (default: this machine's)")
    tr.add_argument("--compile", action="store_true", help="also time every row compiled (model.compile), with its "
                    "compile seconds; e.g. the demo model: --config experiments/debug/tiny.yaml --batch 16 "
                    "--text-tokens 64 --visual-tokens 36")
    tr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tr.add_argument("--out", default=None, help="also write the JSON to this file")


def cmd_data(args: argparse.Namespace, out: TextIO) -> int:
    if args.data_command == "build":
        from .data.build import run_build

        return run_build(args)
    if args.data_command == "tokenizer":
        from .data.datamodule import resolve_shards
        from .data.tokenizer import conversation_texts, train_tokenizer

        urls = resolve_shards(args.shards, field="--shards")
        tok = train_tokenizer(conversation_texts(urls), args.out, args.vocab_size)
        print(f"tokenizer: {len(tok)} tokens (<image> = {tok.convert_tokens_to_ids('<image>')}) from {len(urls)} shard(s) -> {args.out}")
        return 0
    if args.data_command == "export-hf":
        from .data.hf_export import export_hf

        res = export_hf(args.dir, args.split, args.out, args.hf_split)
        print(f"{res['split']}: {res['rows']} rows -> {res['out']} (split {res['hf_split']}); "
              f"skipped on read: {res['skipped'] or 'none'}")
        return 0
    from .data.shards import verify_split

    res = verify_split(args.dir, args.split)
    if args.json:
        emit(res, out)
    else:
        print("| shard | expected | read | sha256 |\n|---|---|---|---|")
        for r in res["shards"]:
            print(f"| {r['name']} | {r['expected']} | {r['read']} | {'ok' if r['sha256_ok'] else 'MISMATCH'} |")
        print(f"{args.split}: read {res['read']} of {res['written']} written; skipped on read: {res['skipped_on_read'] or 'none'}"
              f" -> {'OK' if res['ok'] else 'FAILED'}")
    return 0 if res["ok"] else 1


def _write_and_show(args: argparse.Namespace, res: dict, text: str, out: TextIO) -> int:
    from pathlib import Path

    if getattr(args, "out", None):
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2))
    if args.json:
        emit(res, out)
    else:
        print(text)
    return 0


def _bench_device(args: argparse.Namespace) -> tuple[str, str]:
    """(device type, dtype name) a bench command runs at, with the benches' defaults."""
    from .commands.bench_model import resolve_device

    dev, dt = resolve_device(args.device, args.dtype)
    return dev.type, str(dt).removeprefix("torch.")


def _bench_profile(args: argparse.Namespace):
    """The --profile of a bench command: a file, a datasheet GPU, or (None) this machine's cached profile."""
    from .devprofile import get_profile

    return get_profile(*_bench_device(args), args.profile, progress=None if args.json else print)


def cmd_bench(args: argparse.Namespace, out: TextIO) -> int:
    if args.bench_command in ("prefill", "decode"):
        from .commands.bench_model import bench_spec_note, markdown, run_bench

        section, work = _section_and_workload(args)
        res = run_bench(args.bench_command, section, work, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                        fastv_layer=args.fastv, device=args.device, dtype=args.dtype, progress=not args.json,
                        profile=_bench_profile(args))
        res["config"] = args.config
        return _write_and_show(args, res, bench_spec_note(res) + "\n\n" + markdown(res), out)
    if args.bench_command == "profile":
        return _cmd_bench_profile(args, out)
    if args.bench_command == "serve":
        from .commands.bench_serve import markdown as serve_md, serve_rows
        from .devprofile import get_profile

        section = _section(args)
        prof = get_profile("cuda", "bfloat16", args.profile)
        mem = args.memory_gb * 1e9 if args.memory_gb is not None else None
        tables = [serve_rows(section, prof, grid(g.strip()), text_tokens=args.text_tokens, output_tokens=args.output_tokens,
                             memory_bytes=mem, bytes_per_element=args.bytes_per_element, eager_decode=args.eager_decode)
                  for g in args.grids.split(",") if g.strip()]
        res = {"config": args.config, "profile": prof.describe(), "schedule": section.schedule.describe(), "grids": tables}
        text = f"predicted on {prof.describe()}\nschedule {res['schedule']}\n\n" + "\n\n".join(serve_md(t) for t in tables)
        return _write_and_show(args, res, text, out)
    if args.bench_command == "train":
        from .commands.bench_train import markdown as train_md, run_train_bench

        section, work = _section_and_workload(args)
        res = run_train_bench(section, work, batch=args.batch, repeats=args.repeats, warmup=args.warmup,
                              device=args.device, dtype=args.dtype, progress=not args.json, profile=_bench_profile(args),
                              compile=args.compile)
        res["config"] = args.config
        return _write_and_show(args, res, train_md(res), out)
    from .commands.bench_data import run_bench_data

    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    res = run_bench_data(args.shards, args.tokenizer, args.config, args.batch_size, args.batches, workers)
    if args.json:
        emit(res, out)
    return 0


def _cmd_bench_profile(args: argparse.Namespace, out: TextIO) -> int:
    from .devprofile import datasheet_profile, default_path, get_profile

    dev, dtype = _bench_device(args)
    if args.datasheet:
        prof = datasheet_profile(args.datasheet, dtype)
        path = prof.save(args.out or default_path(dev, dtype).with_name(f"datasheet-{args.datasheet}-{dtype}.json"))
    elif args.out:
        from .devprofile import measure

        prof = measure(dev, dtype, progress=None if args.json else print)
        path = prof.save(args.out)
    else:
        prof = get_profile(dev, dtype, force=args.force, progress=None if args.json else print)
        path = default_path(dev, dtype)
    if args.json:
        emit({"path": str(path), **json.loads(prof.to_json())}, out)
    else:
        print(f"{prof.describe()}\n-> {path}")
    return 0


def _section(args: argparse.Namespace):
    """The config's model section with ``--token-pool`` applied."""
    from dataclasses import replace

    from .config import load_model_section, load_weights_section

    weights = getattr(args, "weights", None)
    section = load_weights_section(weights) if weights else load_model_section(args.config)
    if args.token_pool is not None:
        section.backbone = replace(section.backbone, token_pool=args.token_pool)
        section.backbone.pool_shape  # a bad factor fails here, naming backbone.token_pool
    return section


def _section_and_workload(args: argparse.Namespace):
    """The config's model section (with ``--token-pool`` applied) and the token workload of the arguments."""
    from .flops import Workload

    section = _section(args)
    work = Workload(
        text_tokens=args.text_tokens, visual_tokens=args.visual_tokens, grid=args.grid,
        decode_tokens=args.decode_tokens, bytes_per_element=args.kv_bytes,
    )
    return section, work


def cmd_flops(args: argparse.Namespace, out: TextIO) -> int:
    from .config import DEFAULT_SHAPES
    from .flops import FlopsModel, format_table, workload_dict

    section, work = _section_and_workload(args)
    rows = FlopsModel(section.backbone, section.schedule, section.policy_width).table(work)
    if args.json:
        emit({"config": args.config, "weights": args.weights, "shapes_from": section.source,
              "schedule": section.schedule.describe(), "workload": workload_dict(work, section.backbone),
              "rows": rows}, out)
    else:
        nv = work.resolve_visual(section.backbone)
        if section.source == DEFAULT_SHAPES:
            print(f"note: {args.config} names no backbone, init_from or weights: using {DEFAULT_SHAPES}; "
                  "pass --weights DIR for a trained model's", file=sys.stderr)
        t = section.backbone.text
        print(f"model: {t.num_layers} layers x width {t.hidden_size}, vocabulary {t.vocab_size} "
              f"(shapes from {section.source})")
        print(f"schedule {section.schedule.describe()}  (S always-on SA, s optional SA, C cross-attention, . text-only)")
        tr = f" (VISOR-TR pooling {section.backbone.token_pool}x; dense: {rows[0]['visual_tokens']})" if nv != rows[0]["visual_tokens"] else ""
        print(f"workload: {work.text_tokens} text + {nv} visual tokens{tr}, {work.decode_tokens} decode steps\n")
        print(format_table(rows))
    return 0


def cmd_sizing(args: argparse.Namespace, out: TextIO) -> int:
    from dataclasses import asdict

    from .commands.sizing import assumptions, assumptions_markdown, markdown, sizing_rows

    if args.weights:
        return _cpu_sizing(args, out)
    rows = sizing_rows()
    if args.json:
        emit({"assumptions": assumptions(), "rows": [asdict(r) for r in rows]}, out)
    else:
        print(markdown(rows) + "\n\nAssumptions:\n" + assumptions_markdown())
    return 0


def _cpu_sizing(args: argparse.Namespace, out: TextIO) -> int:
    from .commands.sizing import CPU_ASSUMPTIONS, assumptions_markdown, predict_cpu_stage

    try:
        h, w = (int(x) for x in args.image.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image {args.image!r}: expected HEIGHTxWIDTH, e.g. 768x1024") from None
    r = predict_cpu_stage(args.weights, args.trainable, world=args.world, images=[(h, w)], text_tokens=args.text_tokens,
                          batch=args.batch, zero2=args.zero2)
    if args.json:
        emit({"prediction": r, "assumptions": CPU_ASSUMPTIONS}, out)
        return 0
    print(f"{args.weights}: {r['params'] / 1e6:.1f}M parameters, {r['trainable'] / 1e6:.1f}M trained, "
          f"{r['world']} process(es){' ZeRO-2' if r['zero2'] else ''}, {args.batch} x {h}x{w} image + {args.text_tokens} text tokens")
    print(f"peak host memory {r['total_gb']:.1f} GB = max(loading {r['load_gb']:.1f}, training {r['train_gb']:.1f}); "
          f"states {r['states_gb']:.1f} GB and activations {r['activations_gb']:.1f} GB per process")
    print("Assumptions:\n" + assumptions_markdown(CPU_ASSUMPTIONS))
    return 0


def cmd_ui(args: argparse.Namespace, out: TextIO) -> int:
    import os
    import shutil

    from .lit.tracking import tracking_uri

    store = args.store or tracking_uri()
    if store.startswith(("http://", "https://")):
        raise ValueError(f"the store is already a server ({store}): open it in a browser")
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if exe is None:
        raise FileNotFoundError("the mlflow command is not installed in this environment (make install)")
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # mlflow itself exits 0 on a busy port
        # as the server binds (SO_REUSEADDR): a port a stopped server left in TIME_WAIT is free, a listener is not
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError as e:
            raise ValueError(f"port {args.port} on 127.0.0.1 is taken ({e.strerror}): another `visor ui`? "
                             f"Open it, or pick a free port with --port") from None
    print(f"MLflow UI for {store} at http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    os.execv(exe, [exe, "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(args.port),
                   "--workers", "1"])
    return 0  # not reached


def cmd_mlflow_sync(args: argparse.Namespace, out: TextIO) -> int:
    from .lit.tracking import TrackingUnavailable, sync_unsent

    try:
        n = sync_unsent(args.run_dir)
    except TrackingUnavailable as e:
        raise ValueError(str(e)) from None
    print(f"sent {n} metric values from {args.run_dir}/mlflow_unsent.jsonl")
    return 0


def cmd_demo(args: argparse.Namespace, out: TextIO) -> int:
    from .commands.demo import run_demo

    run_demo(out=args.out, seed=args.seed, images=args.images, repeats=args.repeats, json_path=args.json)
    return 0


LIGHTNING_COMMANDS = ("fit", "validate", "test")


def main(argv: list[str] | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party()
    if argv and argv[0] in LIGHTNING_COMMANDS:  # LightningCLI owns these (its own --help and --print_config)
        from .lit.cli import run_cli

        run_cli(None if from_shell else argv)
        return 0
    if argv and argv[0] == "pipeline":
        from .commands.pipeline import pipeline_main

        return pipeline_main(argv[1:])
    if argv and argv[0] == "eval":
        from .commands.evaluate import eval_main

        return eval_main(argv[1:])
    if argv and argv[0] == "ask":
        from .commands.ask import ask_main

        return ask_main(argv[1:])
    if argv and argv[0] == "config-reference":
        from .commands.config_reference import main as reference_main

        return reference_main(argv[1:])
    if argv and argv[0] == "realsize":
        from .commands.realsize import realsize_main

        return realsize_main(argv[1:])
    if argv and argv[0] == "submit":
        from .commands.slurm import submit_main

        return submit_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    handlers = {"flops": cmd_flops, "demo": cmd_demo, "data": cmd_data, "bench": cmd_bench, "sizing": cmd_sizing,
                "ui": cmd_ui, "mlflow-sync": cmd_mlflow_sync}
    if args.command not in handlers:
        parser.print_help()
        return 2
    with stdout_for_json(getattr(args, "json", None) is True) as out:  # `visor demo --json FILE` names a file
        try:
            return handlers[args.command](args, out)  # out: where a --json document goes (stdout itself)
        except (ValueError, FileNotFoundError, FileExistsError) as e:
            return report(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
