"""Users' image files as upright RGB: any PIL mode (16-bit, float, palette, transparency, CMYK), EXIF orientation,
truncated files caught at load time. data.py's folders, curate.py and visualize.py read every file through here.
"""
import numpy as np
from PIL import Image, ImageOps


def convert_to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16/32-bit grey is rescaled, transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # convert("L") would clip a 16-bit image at 255 (almost all white), so rescale the range instead:
        # integer modes are read as 16-bit (0..65535), float images as 0..1 when they look like it.
        a = np.asarray(img, dtype=np.float32)
        scale = 255.0 / 65535.0 if img.mode.startswith("I") else (255.0 if a.max() <= 1.0 else 1.0)
        img = Image.fromarray(np.clip(a * scale + 0.5, 0, 255).astype(np.uint8))  # mode L
    if img.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        # Transparent pixels often hide black or garbage colours; white is what a viewer shows behind them.
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img.convert("RGBA")).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


def load_image(path) -> Image.Image:
    """Decode a file (path or file object) fully, so that a truncated one raises here (PIL is lazy), upright, as RGB."""
    with Image.open(path) as img:
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # phone photos store pixels sideways + an orientation tag
        return convert_to_rgb(img)
