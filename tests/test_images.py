"""Images as a viewer shows them: mpox.images."""

import numpy as np
from PIL import Image

import monkeypox as mp
import mpox.images


def test_every_image_mode_becomes_the_rgb_a_viewer_shows(tmp_path):
    Image.fromarray(np.full((4, 4), 32768, np.uint16)).save(tmp_path / 'grey16.png')  # I;16: half grey
    assert Image.open(tmp_path / 'grey16.png').mode.startswith('I')
    assert mpox.images.load_rgb(tmp_path / 'grey16.png').getpixel((0, 0)) == (128, 128, 128)
    Image.fromarray(np.full((4, 4), 1000, np.int32), 'I').save(tmp_path / 'grey32.tif')
    assert mpox.images.load_rgb(tmp_path / 'grey32.tif').getpixel((0, 0)) == (4, 4, 4)  # 1000/65535, not clipped
    Image.new('CMYK', (4, 4), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg')
    assert np.allclose(mpox.images.load_rgb(tmp_path / 'cmyk.jpg').getpixel((1, 1)), (255, 0, 0), atol=3)
    Image.new('RGBA', (4, 4), (255, 0, 0, 128)).save(tmp_path / 'rgba.png')  # half-transparent red on white
    assert np.allclose(mpox.images.load_rgb(tmp_path / 'rgba.png').getpixel((0, 0)), (255, 127, 127), atol=1)
    Image.new('LA', (4, 4), (0, 0)).save(tmp_path / 'la.png')
    assert mpox.images.load_rgb(tmp_path / 'la.png').getpixel((0, 0)) == (255, 255, 255)
    pal = Image.new('P', (4, 4), 0)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.info['transparency'] = 0
    pal.save(tmp_path / 'palette.png', transparency=0)
    assert mpox.images.load_rgb(tmp_path / 'palette.png').getpixel((0, 0)) == (255, 255, 255)
    Image.new('1', (4, 4), 1).save(tmp_path / 'bw.png')
    assert mpox.images.load_rgb(tmp_path / 'bw.png').getpixel((0, 0)) == (255, 255, 255)
    Image.new('RGB', (8, 8), (10, 200, 10)).save(tmp_path / 'tiny.png')
    pre = mpox.images.preprocessing(mp.parse_args(['train']))
    assert mpox.images.eval_transform(pre)(mpox.images.load_rgb(tmp_path / 'tiny.png')).shape == (3, 224, 224)


def test_exif_rotation_is_applied_as_a_viewer_does(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :10] = (255, 0, 0)  # stored sideways: red on the left, blue on the right
    a[:, 10:] = (0, 0, 255)
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / 'sideways.jpg', exif=exif, quality=95)
    shown = mpox.images.load_rgb(tmp_path / 'sideways.jpg')
    assert shown.size == (10, 20)
    assert np.allclose(shown.getpixel((5, 2)), (255, 0, 0), atol=8)  # red on top
    assert np.allclose(shown.getpixel((5, 17)), (0, 0, 255), atol=8)
