"""Video at the edge and the cloud, torch-free (Pillow, PyAV, NumPy): reading a user's clip
(reader.read_video, bounded and with clear errors) and the full-cloud H.264 baseline
(h264.H264Stream / H264Decoder, write_mp4). Never imports the toy world: the core may use it."""
from .reader import MAX_FRAMES, MAX_SIDE, MAX_VIDEO_BYTES, Video, VideoError, VideoTooLarge, read_video

__all__ = ["MAX_FRAMES", "MAX_SIDE", "MAX_VIDEO_BYTES", "Video", "VideoError", "VideoTooLarge",
           "read_video"]
