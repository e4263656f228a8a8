"""Messages, one-line errors and what a run may change in its process: mpox.system and mpox.files."""
import os
import warnings

import pytest
import torch

import mpox.files
import mpox.int8
import mpox.model
import mpox.system


def test_the_first_line_of_an_exception_is_its_message_or_its_type():
    assert mpox.system.first_line(ValueError('bad value\nmore detail')) == 'bad value'
    assert mpox.system.first_line(OSError()) == 'OSError'
    assert mpox.system.first_line(RuntimeError('  \n')) == 'RuntimeError'


def test_hidden_warnings_hide_only_the_ones_named():
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        with mpox.system.hidden_warnings((UserWarning, 'routine notice')):
            warnings.warn('routine notice: nothing to do', UserWarning)
            warnings.warn('routine notice, but another kind', DeprecationWarning)
            warnings.warn('something the user must see', UserWarning)
    assert [str(w.message) for w in shown] == ['routine notice, but another kind', 'something the user must see']


def test_the_int8_notices_are_hidden_and_other_warnings_show():
    import mpox.int8
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter('always')
        with mpox.int8.quantization():
            for category, message in mpox.int8.QUANTIZATION_NOTICES:
                warnings.warn(message + ' (as torch words it)', category)
            warnings.warn('an observer saw NaN', RuntimeWarning)
    assert [str(w.message) for w in shown] == ['an observer saw NaN']


def test_environment_sets_variables_for_the_block_only(monkeypatch):
    monkeypatch.delenv('MPOX_TEST_A', raising=False)
    monkeypatch.setenv('MPOX_TEST_B', 'before')
    with mpox.system.environment(MPOX_TEST_A='a', MPOX_TEST_B='b', MPOX_TEST_C=None):
        assert (os.environ['MPOX_TEST_A'], os.environ['MPOX_TEST_B']) == ('a', 'b')
        assert 'MPOX_TEST_C' not in os.environ
    assert 'MPOX_TEST_A' not in os.environ and os.environ['MPOX_TEST_B'] == 'before'


def test_quiet_and_stderr_messages_last_for_their_block(capsys):
    with mpox.system.quiet():
        mpox.system.say('hidden')
        assert mpox.system.muted()
    with mpox.system.messages_to_stderr():
        mpox.system.say('to stderr')
    mpox.system.say('to stdout')
    out, err = capsys.readouterr()
    assert (out, err) == ('to stdout\n', 'to stderr\n') and not mpox.system.muted()


def test_files_are_written_with_the_processes_umask(tmp_path):
    mask = os.umask(0o027)
    os.umask(mask)
    assert mpox.files.umask() == mask
    mpox.files.atomic_write(tmp_path / 'f.txt', lambda f: f.write(b'x'))
    assert (tmp_path / 'f.txt').stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_weights_download_that_fails_names_its_reason(tmp_path):
    import mpox.model
    spec = mpox.model.WeightsSpec('torchvision', 'ResNet18_Weights.X', 'resnet18-none.pth',
                                  (tmp_path / 'nowhere' / 'resnet18-none.pth').as_uri())
    with pytest.raises(mpox.system.UserError, match=r'downloading .* failed \(.*No such file'):
        mpox.model.load_weights('resnet18', spec)


def test_a_failure_with_an_empty_message_still_names_its_reason(monkeypatch):
    """urllib's errors carry `reason`; one whose message is empty must not lose it to its type's name."""
    import mpox.model

    class Refused(OSError):
        reason = 'connection refused by the proxy'

        def __str__(self):
            return ''
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda *a, **k: (_ for _ in ()).throw(Refused()))
    spec = mpox.model.WeightsSpec('torchvision', 'ResNet18_Weights.X', 'resnet18-x.pth', 'https://example.org/x.pth')
    with pytest.raises(mpox.system.UserError, match=r'failed \(connection refused by the proxy\)'):
        mpox.model.load_weights('resnet18', spec)
