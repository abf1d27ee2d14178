"""A store's facts as text, for `dk store info` and `dk label`."""

from __future__ import annotations


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def format_info(info: dict) -> str:
    per = "token" if info["task"] == "sequence" else "example"
    if info["signal"] == "topk":
        what = f"top-{info['k']} + tail at temperature {info['temperature']:g}" + (
            " (tail prior)" if info.get("tail_prior") else ""
        )
    elif info["signal"] == "sampled":
        what = (
            f"{info['k']} draws (distinct ids + counts) at temperature {info['temperature']:g}, "
            f"seed {info['fingerprint'].get('seed')}"
        )
    elif info["signal"] == "head":
        hd = info.get("head") or {}
        what = f"last hidden state + output layer {hd.get('layer')!r} {hd.get('shape')}"
    else:
        what = "dense logits"
    lines = [
        f"store      {info['path']}",
        f"signals    {what}, {info['dtype']}, {info['task']} over {info['vocab']} outputs",
        f"examples   {info['examples']:,}"
        + (f" ({info['positions']:,} valid tokens)" if per == "token" else ""),
        f"size       {_size(info['bytes'])} in {info['shards']} shard(s), "
        f"{info[f'bytes_per_{per}']:.1f} bytes per {per}",
    ]
    if "verified_files" in info:
        lines.append(f"verified   SHA-256 of {info['verified_files']} file(s) as in the manifest")
    if info["hidden"]:
        lines.append("hidden     " + ", ".join(f"{k} {v}" for k, v in info["hidden"].items()))
    lines.append("fingerprint")
    for k, v in info["fingerprint"].items():
        lines.append(f"  {k:<14} {v if v is not None else '-'}")
    return "\n".join(lines)
