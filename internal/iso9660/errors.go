package iso9660

import "errors"

// Errors returned (wrapped) by Write and Image.WriteTo. Test with errors.Is.
var (
	// ErrInvalid reports a volume identifier, file name or time that the
	// image cannot record.
	ErrInvalid = errors.New("invalid image contents")
	// ErrTooLarge reports an image that would exceed MaxImageSize or hold
	// more than MaxFiles files.
	ErrTooLarge = errors.New("image too large")
)
