"""Algorithm core of neural_bone_reg: torch and numpy only, never rclpy or messages."""
