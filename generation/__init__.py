"""Creative generation on top of a trained pipeline: prompt/image walks, audio-driven speed, upscaling."""
