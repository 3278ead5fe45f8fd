"""The README's "three commands" for a user's own photos, run as written on a folder of photos made here."""
import os
import re
import subprocess
import sys

from conftest import COLOURS, REPO, RING, make_shapes_folder


def _three_commands() -> list[str]:
    text = (REPO / 'README.md').read_text()
    block = re.search(r'<!-- three-commands.*?```bash\n(.*?)```', text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readmes_three_commands_work_on_a_plain_folder_of_photos(tmp_path):
    photos = make_shapes_folder(tmp_path / 'photos', dict(red_disc=4, green_bar=5, blue_square=6, yellow_ring=8),
                                {**COLOURS, **RING}, mixed_formats=True)
    (photos / 'red_disc' / 'broken.png').write_bytes(b'not a png')
    commands = _three_commands()
    assert [c.split()[2] for c in commands] == ['fewshot_lkca.finetune', 'fewshot_lkca.predict',
                                                'fewshot_lkca.export']
    env = dict(os.environ, PYTHONPATH=str(REPO))
    outputs = []
    for command in commands:
        command = command.replace('PHOTOS', str(photos)).replace('python ', f'{sys.executable} ', 1)
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f'{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}'
        outputs.append(done.stdout + done.stderr)
    assert 'estimated accuracy' in outputs[0] and '23 training images' in outputs[0]
    assert 'skipped 1 of 24 files' in outputs[0]
    assert all(name in outputs[1] for name in ('red_disc', 'yellow_ring'))  # one line per photo, its top classes
    assert list((tmp_path / 'runs' / 'my-photos').glob('*.pte'))
