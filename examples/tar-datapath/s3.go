package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "ferry.dev/examples/tar-datapath/gen/datapathv1"
)

// newS3Client builds an S3 client from the Repository the agent sent: endpoint and path-style addressing,
// region (default us-east-1), an AWS shared-credentials file and profile, extra CA roots, and the TLS skip flag.
// Errors are gRPC statuses: a repository that cannot be used is FAILED_PRECONDITION.
func newS3Client(ctx context.Context, repo *pb.Repository) (*s3.Client, error) {
	region := repo.GetRegion()
	if region == "" {
		region = "us-east-1"
	}
	tlsConf, err := tlsConfig(repo)
	if err != nil {
		return nil, err
	}
	httpClient := awshttp.NewBuildableClient().WithTransportOptions(func(t *http.Transport) {
		t.TLSClientConfig = tlsConf
	})
	opts := []func(*config.LoadOptions) error{
		config.WithRegion(region),
		config.WithHTTPClient(httpClient),
	}
	if f := repo.GetCredentialsFile(); f != "" {
		if _, err := os.Stat(f); err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "credentials file: %v", err)
		}
		opts = append(opts, config.WithSharedCredentialsFiles([]string{f}))
	}
	if p := repo.GetProfile(); p != "" {
		opts = append(opts, config.WithSharedConfigProfile(p))
	}
	cfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "loading S3 configuration: %v", err)
	}
	return s3.NewFromConfig(cfg, func(o *s3.Options) {
		if ep := repo.GetEndpoint(); ep != "" {
			o.BaseEndpoint = aws.String(ep)
		}
		o.UsePathStyle = repo.GetPathStyle()
		// Many S3-compatible servers do not know the newer default checksums: only send them when required.
		o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
		o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
	}), nil
}

func tlsConfig(repo *pb.Repository) (*tls.Config, error) {
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if repo.GetInsecureSkipTlsVerify() {
		conf.InsecureSkipVerify = true
	}
	if f := repo.GetCaFile(); f != "" {
		pem, err := os.ReadFile(f)
		if err != nil {
			return nil, status.Errorf(codes.FailedPrecondition, "CA file: %v", err)
		}
		pool, err := x509.SystemCertPool()
		if err != nil || pool == nil {
			pool = x509.NewCertPool()
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, status.Errorf(codes.FailedPrecondition, "CA file %s: no PEM certificate in it", f)
		}
		conf.RootCAs = pool
	}
	return conf, nil
}

// joinKey joins key parts with "/", ignoring empty parts and stray slashes.
func joinKey(parts ...string) string {
	var out []string
	for _, p := range parts {
		if p = strings.Trim(p, "/"); p != "" {
			out = append(out, p)
		}
	}
	return strings.Join(out, "/")
}

// isNotFound tells whether an S3 error says the object is not there.
func isNotFound(err error) bool {
	var api smithy.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "NoSuchKey", "NotFound":
			return true
		}
	}
	return false
}

// s3Status turns an S3 (or context) error into the gRPC status the contract asks for: a missing object is
// NOT_FOUND, a missing bucket or refused credentials FAILED_PRECONDITION or PERMISSION_DENIED (no retry), a
// server that cannot be reached UNAVAILABLE (the agent retries), cancellation and deadline their own codes.
func s3Status(ctx context.Context, what string, err error) error {
	if st := ctxStatus(ctx, err); st != nil {
		return st
	}
	if st, ok := status.FromError(err); ok {
		return st.Err()
	}
	msg := fmt.Sprintf("%s: %v", what, err)
	var api smithy.APIError
	if errors.As(err, &api) {
		switch api.ErrorCode() {
		case "NoSuchKey", "NotFound":
			return status.Error(codes.NotFound, msg)
		case "NoSuchBucket":
			return status.Error(codes.FailedPrecondition, msg)
		case "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden":
			return status.Error(codes.PermissionDenied, msg)
		case "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout":
			return status.Error(codes.Unavailable, msg)
		}
		return status.Error(codes.Unknown, msg)
	}
	var certErr *tls.CertificateVerificationError
	if errors.As(err, &certErr) {
		return status.Error(codes.FailedPrecondition, msg) // ca_file or insecure_skip_tls_verify needed
	}
	var netErr net.Error
	var opErr *net.OpError
	if errors.As(err, &opErr) || errors.As(err, &netErr) {
		return status.Error(codes.Unavailable, msg)
	}
	return status.Error(codes.Internal, msg)
}

// ctxStatus returns CANCELLED or DEADLINE_EXCEEDED when the call's context ended, else nil.
func ctxStatus(ctx context.Context, err error) error {
	switch {
	case errors.Is(ctx.Err(), context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	case err != nil && errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, "canceled")
	case err != nil && errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, "deadline exceeded")
	}
	return nil
}
