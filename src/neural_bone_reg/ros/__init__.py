"""ROS 2 front end: nodes, message <-> array conversion, tf, and bag replay."""
