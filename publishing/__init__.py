"""Publishing a trained model: the exported folder, its model card (training and evaluation results), the Hub."""
