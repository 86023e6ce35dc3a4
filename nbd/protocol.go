package nbd

// Wire constants of the NBD protocol (NetworkBlockDevice/nbd doc/proto.md),
// the one set that the server and the client (client.go) both use.

const (
	// nbdMagic opens the server greeting ("NBDMAGIC").
	nbdMagic uint64 = 0x4e42444d41474943
	// optionMagic follows it in newstyle and opens every client option
	// ("IHAVEOPT").
	optionMagic uint64 = 0x49484156454f5054
	// optionReplyMagic opens every option reply.
	optionReplyMagic uint64 = 0x3e889045565a9
	// requestMagic opens every transmission request.
	requestMagic uint32 = 0x25609513
	// simpleReplyMagic opens a simple reply.
	simpleReplyMagic uint32 = 0x67446698
	// structuredReplyMagic opens a structured reply chunk.
	structuredReplyMagic uint32 = 0x668e33ef
)

// Handshake flags, sent by the server.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1
)

// Client flags, sent by the client after the greeting.
const (
	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
)

// Option types.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

// Option reply types; errors have bit 31 set.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repErrUnsup    uint32 = 1<<31 | 1
	repErrPolicy   uint32 = 1<<31 | 2
	repErrInvalid  uint32 = 1<<31 | 3
	repErrTLSReqd  uint32 = 1<<31 | 5
	repErrUnknown  uint32 = 1<<31 | 6
	repErrShutdown uint32 = 1<<31 | 7
	repErrTooBig   uint32 = 1<<31 | 9
)

// Information types of NBD_REP_INFO.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Transmission flags, sent per export.
const (
	tflagHasFlags        uint16 = 1 << 0
	tflagReadOnly        uint16 = 1 << 1
	tflagSendFlush       uint16 = 1 << 2
	tflagSendFUA         uint16 = 1 << 3
	tflagSendTrim        uint16 = 1 << 5
	tflagSendWriteZeroes uint16 = 1 << 6
	tflagSendDF          uint16 = 1 << 7
	tflagCanMultiConn    uint16 = 1 << 8
	tflagSendCache       uint16 = 1 << 10
	tflagSendFastZero    uint16 = 1 << 11
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4

	cmdFlagsKnown = cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
)

// Structured reply chunk flags and types.
const (
	replyFlagDone uint16 = 1 << 0

	replyTypeNone        uint16 = 0
	replyTypeOffsetData  uint16 = 1
	replyTypeBlockStatus uint16 = 5
	replyTypeError       uint16 = 1<<15 | 1
)

// Errno values carried in replies. They are the protocol's own numbers, which
// happen to match Linux.
const (
	errPerm     uint32 = 1
	errIO       uint32 = 5
	errNoMem    uint32 = 12
	errInval    uint32 = 22
	errNoSpc    uint32 = 28
	errOverflow uint32 = 75
	errNotSup   uint32 = 95
	errShutdown uint32 = 108
)

// Metadata contexts: base:allocation for every export, MetaContextExceptions
// for exports whose backend is a COWMapper, each with the id it is given in
// replies; dirty bitmaps (DirtyBitmapNamespace) get ids from
// metaContextFirstBitmapID on, a new one for each selection.
const (
	metaContextBaseAllocation          = "base:allocation"
	metaContextBaseAllocationID uint32 = 1
	metaContextExceptionsID     uint32 = 2
	metaContextFirstBitmapID    uint32 = 3
)

// Sizes of fixed wire structures.
const (
	requestHeaderSize         = 28
	simpleReplyHeaderSize     = 16
	structuredReplyHeaderSize = 20
	optionHeaderSize          = 16
)

// Handshake values only a client needs: the oldstyle greeting's second magic
// (a server without options or exports), and the option errors the server
// here never sends but other servers do.
const (
	oldstyleMagic uint64 = 0x0000420281861253

	repErrPlatform      uint32 = 1<<31 | 4
	repErrBlockSizeReqd uint32 = 1<<31 | 8
	repErrBit           uint32 = 1 << 31
)
