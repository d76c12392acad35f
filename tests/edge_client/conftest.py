import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from edge_client.testing import train_tokenizer
    return train_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    from edge_client.testing import tiny_model_and_tokenizer
    model, _ = tiny_model_and_tokenizer(seed=0)
    return model


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    from edge_client.testing import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer(seed=0)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
