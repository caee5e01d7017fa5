"""`btp convert ...` (owned by btp.model). torch is imported inside the command."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

convert_app = typer.Typer(help="Convert third-party checkpoints into btp's checkpoint format.",
                          no_args_is_help=True)


@convert_app.command("ulip2")
def ulip2(
    point_ckpt: Path = typer.Option(..., "--point-ckpt", help="Official ULIP-2 checkpoint (.pt) with "
                                    "`state_dict` holding module.point_encoder.* and module.pc_projection."),
    clip_ckpt: Optional[Path] = typer.Option(None, "--clip-ckpt", help="open_clip_pytorch_model.bin of the "
                                             "text tower (default: module.open_clip_model.* inside --point-ckpt, if any)."),
    out: Path = typer.Option(..., "--out", help="Output btp checkpoint (.safetensors)."),
    heads: Optional[int] = typer.Option(None, "--heads", help="PointBERT attention heads (default trans_dim / 64)."),
    text_heads: Optional[int] = typer.Option(None, "--text-heads", help="Text tower heads (default width / 64)."),
    config: str = typer.Option("ulip2", "--config", help="Base config preset for what weights do not tell "
                               "(G, K, feature layers, scoring): ulip2 | btp-mini | tiny."),
    seed: int = typer.Option(0, "--seed", help="Seed for the freshly initialised BTP heads."),
) -> None:
    """Map an official ULIP-2 PointBERT checkpoint (+ OpenCLIP text tower) into a btp checkpoint.

    Dimensions are inferred from tensor shapes. Any missing, unexpected or mis-shaped key is listed and the command exits with code 1.

    Checkpoints are read with torch.load(weights_only=True); the output is a safetensors file.
    """
    from btp.model.checkpoint import save_checkpoint
    from btp.model.convert import ConversionError, conversion_provenance, convert_ulip2

    try:
        model, report = convert_ulip2(point_ckpt, clip_ckpt, heads=heads, text_heads=text_heads,
                                      base_config=config, seed=seed)
    except ConversionError as exc:
        typer.echo(f"btp convert ulip2: {exc}", err=True)
        raise typer.Exit(code=1) from None
    except ValueError as exc:  # unknown --config preset
        typer.echo(f"btp convert ulip2: {exc}", err=True)
        raise typer.Exit(code=1) from None
    path = save_checkpoint(out, model, conversion_provenance(point_ckpt, clip_ckpt, report, seed))
    e = report.config.encoder
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): PointBERT trans_dim={e.trans_dim} "
               f"depth={e.depth} heads={e.num_heads} in_channels={e.in_channels}, D={report.config.text.embed_dim}, "
               f"{report.point_keys} point tensors, {report.text_keys} text tensors"
               + (f" from {report.text_source}" if report.text_source else " (no text tower)"))
    if report.ignored:
        typer.echo("ignored: " + ", ".join(report.ignored))


@convert_app.command("btp-3dad")
def btp3dad(
    heads_ckpt: Path = typer.Option(..., "--heads", help="best.pth of the official BTP-3DAD train.py "
                                    "(patch_feature_embedder, patch_geo_encoder, prompt_learner)."),
    point_ckpt: Path = typer.Option(..., "--point-ckpt", help="ULIP-2-PointBERT-10k-xyzrgb-pc-vit_g-"
                                    "objaverse_shapenet-pretrained.pt (module.point_encoder.*, module.pc_projection)."),
    clip_ckpt: Optional[Path] = typer.Option(None, "--clip-ckpt", help="open_clip_pytorch_model.bin of "
                                             "ViT-bigG-14 (default: module.open_clip_model.* inside --point-ckpt)."),
    out: Path = typer.Option(..., "--out", help="Output btp checkpoint (.safetensors)."),
    use_learned_context: bool = typer.Option(False, "--use-learned-context", help="Freeze the text "
                                             "embeddings through the learned prompt context (the official "
                                             "scoring does not use it: default off)."),
    heads: Optional[int] = typer.Option(None, "--attention-heads", help="PointBERT attention heads (default trans_dim / 64)."),
    text_heads: Optional[int] = typer.Option(None, "--text-heads", help="Text tower heads (default width / 64)."),
) -> None:
    """Bring in a model trained with the official BTP-3DAD code: encoder, heads and the frozen text
    embeddings computed as its scoring does, in one btp checkpoint (config preset btp-3dad).

    Every file is read with torch.load(weights_only=True); a missing, unexpected or mis-shaped
    key is listed by name and the command exits with code 1.
    """
    from btp.model.checkpoint import save_checkpoint
    from btp.model.convert import ConversionError, btp3dad_provenance, convert_btp3dad

    try:
        model, report = convert_btp3dad(heads_ckpt, point_ckpt, clip_ckpt, use_learned_context=use_learned_context,
                                        heads=heads, text_heads=text_heads)
    except ConversionError as exc:
        typer.echo(f"btp convert btp-3dad: {exc}", err=True)
        raise typer.Exit(code=1) from None
    path = save_checkpoint(out, model, btp3dad_provenance(heads_ckpt, point_ckpt, clip_ckpt, report,
                                                          use_learned_context))
    cfg = report.config
    typer.echo(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {cfg.name}, PointBERT trans_dim="
               f"{cfg.encoder.trans_dim} depth={cfg.encoder.depth}, G={cfg.encoder.num_group} "
               f"K={cfg.encoder.group_size} N={cfg.preprocess.num_points}, D={cfg.text.embed_dim}, "
               f"object = {cfg.scoring.object_alpha} x global + {1 - cfg.scoring.object_alpha} x mean of the top "
               f"{cfg.scoring.top_ratio:.0%} patches; text frozen "
               + ("through the learned context" if use_learned_context else 'from "normal ." / "defective ."'))
