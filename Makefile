# The README's two commands: `make demo` (set-up + main job) and `make test` (set-up + tests).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean fashion-mnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[all,test]"
	touch $(STAMP)

setup: $(STAMP)

# The demo's protection runs on Fashion-MNIST item scenes; without the dataset (no apt-get) it falls back to
# flat-colour scenes and says so.
demo: $(STAMP)
	-@$(MAKE) --no-print-directory fashion-mnist
	$(BIN)/aigis demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Fashion-MNIST for the "fashion" captioned scenes (protection/fashion.py): Debian's package, unpacked
# under runs/assets without installing it (apt-get download needs no root; the files are 30 MB).
FASHION := runs/assets/fashion-mnist
fashion-mnist:
	@if [ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST already installed in /usr/share/datasets/fashion-mnist"; \
	elif [ -f $(FASHION)/t10k-labels-idx1-ubyte.gz ]; then echo "Fashion-MNIST already in $(FASHION)"; else \
		rm -rf runs/assets/.fashion-deb && mkdir -p runs/assets/.fashion-deb $(FASHION) && \
		cd runs/assets/.fashion-deb && apt-get download dataset-fashion-mnist && \
		dpkg-deb -x dataset-fashion-mnist_*.deb root && \
		cp root/usr/share/datasets/fashion-mnist/*.gz ../fashion-mnist/ && cd .. && rm -rf .fashion-deb && \
		echo "Fashion-MNIST in $(FASHION)"; fi

clean:
	rm -rf runs .pytest_cache
