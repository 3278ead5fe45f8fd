"""The README's "three commands" for a user's own photos, and its device commands, run as written on folders of photos
made here."""
import os
import re
import subprocess
import sys

from conftest import COLOURS, REPO, RING, make_shapes_folder


def _commands(name: str = 'three-commands') -> list[str]:
    text = (REPO / 'README.md').read_text()
    block = re.search(rf'<!-- {name}.*?```bash\n(.*?)```', text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def _run(command: str, cwd, env) -> str:
    command = command.replace('python ', f'{sys.executable} ', 1)
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f'{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}'
    return done.stdout + done.stderr


def test_the_readmes_three_commands_work_on_a_plain_folder_of_photos(tmp_path):
    photos = make_shapes_folder(tmp_path / 'photos', dict(red_disc=4, green_bar=5, blue_square=6, yellow_ring=8),
                                {**COLOURS, **RING}, mixed_formats=True)
    (photos / 'red_disc' / 'broken.png').write_bytes(b'not a png')
    commands = _commands()
    assert [c.split()[2] for c in commands] == ['fewshot_lkca.finetune', 'fewshot_lkca.predict',
                                                'fewshot_lkca.export']
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outputs = [_run(command.replace('PHOTOS', str(photos)), tmp_path, env) for command in commands]
    assert 'estimated accuracy' in outputs[0] and '23 training images' in outputs[0]
    assert 'skipped 1 of 24 files' in outputs[0]
    assert all(name in outputs[1] for name in ('red_disc', 'yellow_ring'))  # one line per photo, its top classes
    assert list((tmp_path / 'runs' / 'my-photos').glob('*.pte'))

    # the device commands, on the model those made: new classes, predict, more classes
    device = tmp_path / 'device'
    device.mkdir()
    (tmp_path / 'runs' / 'my-photos' / 'model.int8.onnx').rename(device / 'model.int8.onnx')
    new = make_shapes_folder(device / 'new', dict(blue_disc=3, green_ring=4), dict(blue_disc=(30, 30, 220),
                                                                                  green_ring=(30, 200, 30)),
                             mixed_formats=True)
    more = make_shapes_folder(device / 'more', 3, dict(red_bar=(220, 30, 30)))
    commands = _commands('device-commands')
    assert [c.split()[2] for c in commands] == ['fewshot_lkca.adapt', 'fewshot_lkca.predict', 'fewshot_lkca.adapt']
    outputs = [_run(c.replace('MORE_PHOTOS', str(more)).replace('NEW_PHOTOS', str(new)), device, env)
               for c in commands]
    assert 'learned 2 classes from 7 images' in outputs[0] and 'blue_disc' in outputs[1]
    assert 'kept 2 it had' in outputs[2] and (device / 'mine-more.onnx').is_file()
