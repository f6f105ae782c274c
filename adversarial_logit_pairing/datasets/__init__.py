"""Input pipelines of the original TFRecord layouts, and the converters that write them.

  dataset_factory            get_dataset / count_records / locate_bad_record by data set name
  dataset_facts              each data set's directory flag, files, epoch sizes, class count
  imagenet_input             TF-Slim ImageNet shards -> preprocessed batches
  tiny_imagenet_input        converted Tiny ImageNet records -> preprocessed batches
  input_pipeline             tf.data plumbing shared by both (read, shuffle, map, batch)
  image_decoding             TF-only decoding (any JPEG colour space, PNG), crops, TF1 resize
  tiny_imagenet_conversion   raw Tiny ImageNet folder -> train/validation/test.tfrecord
  imagenet_conversion        raw ImageNet folders -> train-*/validation-* TF-Slim shards
  tfrecord_files             atomic TFRecord writing, tf.train.Example features, counting
"""
