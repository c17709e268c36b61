"""Images and datasets: what the search, the recovery and the checks run the model on.

``folders`` reads an ImageFolder (``--data``) through the model's own timm preprocessing;
``builtin`` draws augmented crops of the photographs bundled with scikit-image for runs without
``--data``; ``fashion_mnist`` writes Fashion-MNIST (the Debian package) as an ImageFolder.
"""
