"""Generation on top of a trained pipeline: text/image -> video (generate), prompt/image walks, audio-driven speed,
upscaling."""
