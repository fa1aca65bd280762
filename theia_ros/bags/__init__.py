"""rosbag2 tools without ROS (plain Python over the `rosbags` library): io (reading, writing, types),
salvage (damaged bags), encode (encode-bag), inspect, record (a writer fed with CDR bytes) and
train_policy (behaviour cloning from bags of features)."""
