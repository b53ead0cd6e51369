// Package deadletters defines the dead-letter message: what a stage publishes to the
// DLQ stream for input it cannot accept, and what the sink stores in the
// dead_letters table.
//
// A dead letter is published to dlq.<stage>. Its payload is the input's own (or, for
// one event of a batch message, that element's), its headers are the input's (but
// Nats-*; its Nats-Msg-Id is kept as HeaderMsgID) plus the ones below, and its Nats-Msg-Id is ID: derived from the input's
// stream position, so a retry is not a second dead letter.
package deadletters

import "strconv"

// Subject prefix and headers of a dead letter.
const (
	// SubjectPrefix, then the stage's name, is a dead letter's subject.
	SubjectPrefix = "dlq."
	// HeaderReason says, for people, why the input was refused.
	HeaderReason = "Sluice-Reason"
	// HeaderStage names the stage that refused it.
	HeaderStage = "Sluice-Stage"
	// HeaderSubject is the subject the input was published to.
	HeaderSubject = "Sluice-Subject"
	// HeaderStream and HeaderStreamSeq are where the input was stored.
	HeaderStream    = "Sluice-Stream"
	HeaderStreamSeq = "Sluice-Stream-Seq"
	// HeaderReceivedAt is when its stream stored the input (RFC 3339, nanoseconds).
	HeaderReceivedAt = "Sluice-Received"
	// HeaderElement is the index of an event in its batch message: on the dead
	// letter of one element (and on the keying step's copy of one element).
	HeaderElement = "Sluice-Element"
	// HeaderMsgID is the input's own Nats-Msg-Id (a dead letter has its own), on
	// the dead letter of a whole message: a replay publishes with it again, so the
	// event keeps its key.
	HeaderMsgID = "Sluice-Msg-Id"
	// HeaderTruncated is on a dead letter whose payload is only the start of its
	// input's (which did not fit the server's max_payload): the input's size in
	// bytes. Such a dead letter cannot be replayed.
	HeaderTruncated = "Sluice-Truncated"
)

// Subject is the subject of stage's dead letters.
func Subject(stage string) string { return SubjectPrefix + stage }

// ID is the Nats-Msg-Id of the dead letter of the input stored at seq in stream;
// element is the index of the refused event in its batch message, or negative for
// the whole message.
func ID(stream string, seq uint64, element int) string {
	return withElement("dlq:"+stream+":"+strconv.FormatUint(seq, 10), element)
}

// UnplacedID is the Nats-Msg-Id of a dead letter whose input has no stream position
// (no JetStream metadata): by stage and subject (and element, as for ID).
func UnplacedID(stage, subject string, element int) string {
	return withElement("dlq:"+stage+":"+subject, element)
}

// ImportID is the Nats-Msg-Id of the dead letter of line (counted from 1) of a file
// `sluice import` could not publish; file is the file's checkpoint key (its
// content's digest), so an import run again does not add a second dead letter.
func ImportID(file string, line int64) string {
	return "dlq:import:" + file + ":" + strconv.FormatInt(line, 10)
}

func withElement(id string, element int) string {
	if element >= 0 {
		id += ":" + strconv.Itoa(element)
	}
	return id
}

// HeaderReplayOf marks input that `sluice dlq replay` published again: the DLQ
// sequence of the dead letter it replays.
const HeaderReplayOf = "Sluice-Replay-Of"

// ReplayID is the Nats-Msg-Id of a replay of the dead letter at seq in the DLQ: a
// replay published twice within its stream's duplicate window is stored once.
func ReplayID(seq uint64) string { return "replay:DLQ:" + strconv.FormatUint(seq, 10) }
