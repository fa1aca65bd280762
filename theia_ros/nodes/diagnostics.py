"""/diagnostics messages the way every theia_ros node builds them (diagnostic_msgs)."""
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


def diagnostic_status(name, hardware_id, *, warn, message, values) -> DiagnosticStatus:
    """One status: WARN or OK, a one-line message, and `values` ({key: value}) as strings."""
    status = DiagnosticStatus(name=name, hardware_id=str(hardware_id), message=message,
                              level=DiagnosticStatus.WARN if warn else DiagnosticStatus.OK)
    status.values = [KeyValue(key=str(k), value=str(v)) for k, v in values.items()]
    return status


def diagnostic_array(node, statuses) -> DiagnosticArray:
    """The statuses stamped with the node's clock."""
    array = DiagnosticArray(status=list(statuses))
    array.header.stamp = node.get_clock().now().to_msg()
    return array
