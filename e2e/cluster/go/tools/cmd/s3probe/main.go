// s3probe: a tiny static S3 client (aws-sdk-go-v2) for the e2e cluster's checks, run on the host or in a pod.
//
//	s3probe put KEY VALUE | get KEY | ls [PREFIX] | roundtrip KEY VALUE | mkbucket
//
// Configuration from the environment: FERRY_S3_ENDPOINT, FERRY_S3_BUCKET, AWS_ACCESS_KEY_ID,
// AWS_SECRET_ACCESS_KEY, AWS_REGION (default us-east-1). Path-style addressing.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

func env(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

func fail(f string, a ...any) {
	fmt.Fprintf(os.Stderr, "s3probe: "+f+"\n", a...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: s3probe put KEY VALUE | get KEY | ls [PREFIX] | roundtrip KEY VALUE | mkbucket")
	}
	endpoint, bucket := os.Getenv("FERRY_S3_ENDPOINT"), os.Getenv("FERRY_S3_BUCKET")
	if endpoint == "" || bucket == "" {
		fail("FERRY_S3_ENDPOINT and FERRY_S3_BUCKET must be set")
	}
	c := s3.New(s3.Options{
		Region:       env("AWS_REGION", "us-east-1"),
		BaseEndpoint: aws.String(endpoint),
		UsePathStyle: true,
		Credentials: credentials.NewStaticCredentialsProvider(
			os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), ""),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	put := func(key, val string) {
		_, err := c.PutObject(ctx, &s3.PutObjectInput{Bucket: &bucket, Key: aws.String(key), Body: bytes.NewReader([]byte(val))})
		if err != nil {
			fail("put %s/%s: %v", bucket, key, err)
		}
		fmt.Printf("put %s/%s (%d bytes)\n", bucket, key, len(val))
	}
	get := func(key string) string {
		o, err := c.GetObject(ctx, &s3.GetObjectInput{Bucket: &bucket, Key: aws.String(key)})
		if err != nil {
			fail("get %s/%s: %v", bucket, key, err)
		}
		defer o.Body.Close()
		b, err := io.ReadAll(o.Body)
		if err != nil {
			fail("read %s/%s: %v", bucket, key, err)
		}
		return string(b)
	}
	switch cmd := os.Args[1]; {
	case cmd == "mkbucket":
		_, err := c.CreateBucket(ctx, &s3.CreateBucketInput{Bucket: &bucket})
		var owned *types.BucketAlreadyOwnedByYou
		var exists *types.BucketAlreadyExists
		if err != nil && !errors.As(err, &owned) && !errors.As(err, &exists) {
			fail("create bucket %s: %v", bucket, err)
		}
		fmt.Printf("bucket %s ready\n", bucket)
	case cmd == "put" && len(os.Args) == 4:
		put(os.Args[2], os.Args[3])
	case cmd == "get" && len(os.Args) == 3:
		fmt.Print(get(os.Args[2]))
	case cmd == "ls":
		prefix := ""
		if len(os.Args) > 2 {
			prefix = os.Args[2]
		}
		o, err := c.ListObjectsV2(ctx, &s3.ListObjectsV2Input{Bucket: &bucket, Prefix: &prefix})
		if err != nil {
			fail("list %s: %v", bucket, err)
		}
		for _, ob := range o.Contents {
			fmt.Printf("%s\t%d\n", aws.ToString(ob.Key), aws.ToInt64(ob.Size))
		}
	case cmd == "roundtrip" && len(os.Args) == 4:
		put(os.Args[2], os.Args[3])
		if got := get(os.Args[2]); got != os.Args[3] {
			fail("roundtrip mismatch: wrote %q, read %q", os.Args[3], got)
		}
		fmt.Printf("roundtrip ok %s/%s\n", bucket, os.Args[2])
	default:
		fail("bad arguments %q", os.Args[1:])
	}
}
