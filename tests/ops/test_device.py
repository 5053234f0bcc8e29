import torch

from hla.ops.device import sm_count


def test_sm_count():
    assert sm_count(torch.device("cpu")) == 4  # the interpreter's plausible count
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        assert sm_count(torch.device("cuda")) == sm_count(torch.device("cuda", torch.cuda.current_device()))
        assert sm_count(torch.device("cuda")) == props.multi_processor_count
