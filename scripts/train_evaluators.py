"""Train, calibrate and save the miniature world's evaluators (seeded; ~15 min on one busy core).

    python scripts/train_evaluators.py                 # everything: data, identity, text-image, calibration
    python scripts/train_evaluators.py identity        # one network only (then run `calibrate`)
    python scripts/train_evaluators.py calibrate       # only re-calibrate the saved weights
    python scripts/train_evaluators.py --device cuda --workers 16   # nets and camera on a GPU, 16 renderers

Writes ``src/loraclr/world/assets/evaluators/{identity,text_image}.safetensors`` (fp16) and
``evaluators.json`` (threshold, accuracy, retrieval rates, and how they were measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from loraclr.evaluate.nets import save_net
from loraclr.evaluate.world import ASSETS, calibrate, evaluate_retrieval, load_world_evaluator
from loraclr.world import evaluator_training as T

log = logging.getLogger("train_evaluators")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", nargs="?", default="all", choices=["all", "identity", "text-image", "calibrate"])
    p.add_argument("--out", default=str(ASSETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenes", type=int, default=14000, help="training renders")
    p.add_argument("--pool", type=int, default=1500, help="base identities with their own class")
    p.add_argument("--p-near", type=float, default=0.25, help="share of one-trait concept variants (identity)")
    p.add_argument("--identity-steps", type=int, default=1200)
    p.add_argument("--clip-steps", type=int, default=800)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--p-camera", type=float, default=0.5,
                   help="share of training images seen through the world's VAE (0 = renders only)")
    p.add_argument("--camera", default="mini",
                   help="base model whose VAE is the camera ('none' = no round trips, threshold on renders)")
    p.add_argument("--device", default="cpu",
                   help="where the nets train and the camera round trips run: cpu (default), cuda ...")
    p.add_argument("--workers", type=int, default=1, help="processes rendering the training scenes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    pool = T.identity_pool(args.pool, args.seed)

    def report(name):
        def cb(step, loss):
            if step % 100 == 0:
                log.info("%s step %d loss %.4f", name, step, loss)
        return cb

    def progress(i):
        log.info("rendered %d", i)

    camera = None
    if args.camera != "none":
        from loraclr.pipeline import load_base

        camera = load_base(args.camera).vae.float().eval().to(args.device)  # round trips come back on the CPU

    def with_camera(data):
        if camera is not None and args.p_camera > 0:
            t0 = time.time()
            data.images_camera = T.camera_roundtrip(data.images, camera)
            log.info("camera round trips of %d renders in %.0fs", len(data.images), time.time() - t0)
        return data

    if args.stage in ("all", "identity"):
        # its own renders: a quarter of the characters are one-trait variants of the concepts (hard negatives)
        t0 = time.time()
        near = T.near_misses(list(T.S.CONCEPTS.values()))
        data = with_camera(T.render_data(args.scenes, args.seed + 1, pool, progress, workers=args.workers,
                                         near=near, p_near=args.p_near))
        timings["identity_render_s"] = time.time() - t0
        log.info("identity data: %d renders, %d crops, %d classes (%d near misses)", len(data.captions),
                 len(data.crop_image), len(data.classes), len(near))
        t0 = time.time()
        ident = T.train_identity(data, args.identity_steps, seed=args.seed, p_camera=args.p_camera,
                                 callback=report("identity"), device=args.device)  # returned on the CPU
        timings["identity_train_s"] = time.time() - t0
        save_net(ident, out / "identity.safetensors", {"steps": args.identity_steps, "seed": args.seed,
                                                       "scenes": args.scenes, "pool": args.pool,
                                                       "p_near": args.p_near, "p_camera": args.p_camera,
                                                       "camera": args.camera})
        del data
    if args.stage in ("all", "text-image"):
        from loraclr.world.tokenizer import load_tokenizer

        t0 = time.time()
        data = with_camera(T.render_data(args.scenes, args.seed, pool, progress, workers=args.workers))
        timings["text_image_render_s"] = time.time() - t0
        t0 = time.time()
        clip = T.train_text_image(data, load_tokenizer(), args.clip_steps, seed=args.seed,
                                  p_camera=args.p_camera, callback=report("text-image"), device=args.device)
        timings["text_image_train_s"] = time.time() - t0
        save_net(clip, out / "text_image.safetensors", {"steps": args.clip_steps, "seed": args.seed,
                                                        "scenes": args.scenes, "p_camera": args.p_camera,
                                                        "camera": args.camera})
        del data
    if args.stage in ("all", "calibrate"):
        t0 = time.time()
        ev = load_world_evaluator(out, calibrated=False)
        cal = calibrate(ev, seed=args.seed, camera=camera)
        ret = evaluate_retrieval(ev, seed=args.seed)
        timings["calibrate_s"] = time.time() - t0
        info = {"identity": cal, "text_image": ret, "timings_s": timings,
                "command": "python scripts/train_evaluators.py " + " ".join(argv or sys.argv[1:])}
        old = out / "evaluators.json"
        if old.is_file() and args.stage != "all":
            info["timings_s"] = {**json.loads(old.read_text()).get("timings_s", {}), **timings}
        old.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        log.info("identity: %s", {k: v for k, v in cal.items() if not isinstance(v, dict)})
        log.info("text-image: %s", ret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
