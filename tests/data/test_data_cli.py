"""`metagg data`: where each dataset is, and checking one."""

from metagg.cli import main


def test_list_says_where_each_dataset_is_or_how_to_get_it(tmp_path, make_idx_dataset,
                                                          make_cifar_batches, no_system_dirs,
                                                          capsys):
    make_idx_dataset(tmp_path / "mnist")
    assert main(["data", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert str(tmp_path / "mnist") in lines["mnist"]
    assert "missing" in lines["fashion_mnist"] and "metagg data download fashion_mnist" in \
        lines["fashion_mnist"]
    assert "missing" in lines["cifar10"]
    make_cifar_batches(tmp_path / "cifar10" / "cifar-10-batches-py")
    main(["data", "list", "--data-dir", str(tmp_path)])
    assert "missing" not in capsys.readouterr().out.split("cifar10")[1].splitlines()[0]


def test_check_loads_and_reports_sizes_or_a_one_line_error(tmp_path, make_idx_dataset,
                                                           no_system_dirs, capsys):
    make_idx_dataset(tmp_path, n_train=30, n_test=10)
    assert main(["data", "check", "mnist", "--data-dir", str(tmp_path)]) == 0
    assert "mnist: 30 train + 10 test examples of shape (1, 28, 28), 10 classes" in \
        capsys.readouterr().out
    assert main(["data", "check", "fashion-mnist", "--data-dir", str(tmp_path / "none")]) == 2
    assert "Fashion-MNIST not found" in capsys.readouterr().err
    assert main(["data", "check"]) == 2
    assert "name a dataset" in capsys.readouterr().err


def test_aliases_are_resolved_and_located(tmp_path, make_idx_dataset, no_system_dirs, capsys):
    make_idx_dataset(tmp_path / "fashion_mnist", n_train=20, n_test=10)
    assert main(["data", "check", "fmnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fashion_mnist: 20 train") and str(tmp_path / "fashion_mnist") in out
