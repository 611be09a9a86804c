"""Detections on a video: every frame through the model, drawn into a new video, and listed per frame in a json file.

    video.annotate_video("drone.mp4", "out/", annotate, class_names, batch_size=4)  # -> out/drone.mp4, out/drone.json

Needs PyAV (pip install av, in requirements-extras.txt), imported only here. predict.py enters here for a video file
among its inputs. Delete this file and that call and images still work.
"""

import json
from fractions import Fraction
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import to_dtype

from utils import SetupError

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv")
DEFAULT_RATE = Fraction(25)  # frames/s written when a file states none (25: the PAL rate, common in raw streams)


def import_av():
    try:
        import av
    except ImportError:
        raise SetupError("videos are read and written with PyAV: pip install av") from None
    return av


def open_writer(av, path, width, height, rate):
    """An mp4 container and its H.264 stream (MPEG-4 part 2 where this FFmpeg build has no libx264)."""
    container = av.open(str(path), "w")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"  # what every player decodes
    return container, stream


def annotate_video(path, out_dir, annotate, class_names, batch_size=1, progress=None):
    """Run `annotate` on every frame of the video at `path` and write OUT_DIR/<stem>.mp4 and OUT_DIR/<stem>.json.

    annotate: a list of float [3, H, W] frames in [0, 1] -> [(drawing uint8 [3, H, W], [detection dicts])], called
    with `batch_size` frames at a time. The mp4 holds the drawings at the source's frame rate (H.264 needs an even
    width and height: an odd one loses its last row / column). The json: {"video", "fps", "width", "height",
    "categories": [{"id", "name"}], "frames": [{"frame": index from 0, "time": seconds from the file's timestamps,
    "detections": [...]}]}. progress(total, unit): an object with update(count, name) and close(). -> frames read.
    """
    av = import_av()
    path, out_dir = Path(path), Path(out_dir)
    out_video, out_json = out_dir / f"{path.stem}.mp4", out_dir / f"{path.stem}.json"
    if out_video.resolve() == path.resolve():
        raise SetupError(f"{path} would be overwritten by its drawn copy; pass another --out")
    try:
        source = av.open(str(path))
    except av.FFmpegError as e:
        raise SetupError(f"cannot read video {path}: {e}") from None
    with source:
        if not source.streams.video:
            raise SetupError(f"{path} holds no video stream")
        stream = source.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg decodes on several threads; frames still come in order
        rate = stream.average_rate or stream.guessed_rate or DEFAULT_RATE
        width, height = stream.codec_context.width // 2 * 2, stream.codec_context.height // 2 * 2
        sink, out_stream = open_writer(av, out_video, width, height, rate)
        meter = progress(stream.frames or None, "frames") if progress else None  # some containers do not count
        frames, batch = [], []

        def flush():
            pixels = [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in batch]  # uint8 [3, H, W]
            images = [to_dtype(image, torch.float32, scale=True) for image in pixels]
            for frame, (drawing, detections) in zip(batch, annotate(images)):
                picture = drawing[:, :height, :width].permute(1, 2, 0).contiguous().numpy()
                sink.mux(out_stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
                # the frame's own timestamp: right for variable frame rates too (the mp4 is written at a fixed rate)
                time = frame.time if frame.time is not None else len(frames) / rate
                frames.append({"frame": len(frames), "time": round(float(time), 6), "detections": detections})
            if meter:
                meter.update(len(batch), path.name)
            batch.clear()

        try:
            for frame in source.decode(stream):
                batch.append(frame)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
            sink.mux(out_stream.encode(None))  # the frames the encoder still holds
        finally:
            sink.close()
            if meter:
                meter.close()
    categories = [{"id": k, "name": name} for k, name in enumerate(class_names, start=1)]
    record = {"video": str(path), "fps": float(rate), "width": width, "height": height, "categories": categories}
    out_json.write_text(json.dumps(record | {"frames": frames}))
    return len(frames)
