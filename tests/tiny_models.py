"""The tiny random-weight model configs the unit tests build (one place, so every test means the same
"tiny model"). Importable because conftest.py puts tests/ on sys.path."""

TINY = dict(
    llm="tiny-random",
    vision="efficientnet-lite0-random",
    image_size=32,
    visual_grid=2,
    lora_r=4,
    lora_alpha=8,
)

# The same with the face encoder (random mini-Xception), its 2x2 face tokens and the face-label token.
TINY_FACE = dict(TINY, face_encoder="mini-xception-random", face_grid=2, face_label_token=True)
