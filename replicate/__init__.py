"""replicate: train and compare image classifiers for real-estate listing photos.

    replicate --help

A fastai replication of Råhlén & Sjöqvist (2019), "Image classification of real
estate images with transfer learning". One module per stage of the data's journey:
`data` (folders -> DataLoaders), `models` (arch name -> Learner), `train` (one
experiment -> a run folder), `report` (run folder -> plots); `cli` only parses.
"""

__version__ = "0.1.0"
