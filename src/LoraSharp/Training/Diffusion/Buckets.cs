namespace LoraSharp.Training.Diffusion;

/// <summary>Where an image goes: the bucket size, the size it is resized to (covering the bucket) and the crop offset.</summary>
public sealed record BucketPlacement(int BucketWidth, int BucketHeight, int ResizedWidth, int ResizedHeight, int CropLeft, int CropTop);

/// <summary>
/// kohya's aspect-ratio buckets: max area = resolution W·H; predefined buckets are the square
/// ⌊√area/step⌋·step and, for each width w = min, min+step, …, max, h = min(max, ⌊area/w/step⌋·step) when h ≥ min, as
/// (w, h) and (h, w). An image goes to the bucket with the closest aspect ratio, is scaled so it covers the bucket and is
/// center-cropped. With <c>no_upscale</c> the bucket is the image size (scaled down to the area if larger) rounded down
/// to the step. Without buckets every image is covered-and-cropped to the resolution.
/// </summary>
public sealed class BucketManager
{
    readonly List<(int W, int H)> _resos;
    public int MaxArea { get; }
    public int Step { get; }
    public bool Enabled { get; }
    public bool NoUpscale { get; }
    public (int W, int H) Resolution { get; }

    /// <summary>The predefined buckets (sorted by width, then height); a single entry without buckets.</summary>
    public IReadOnlyList<(int W, int H)> Resolutions => _resos;

    public BucketManager((int W, int H) resolution, bool enabled, int minReso = 256, int maxReso = 1024, int step = 64, bool noUpscale = false)
    {
        Resolution = resolution;
        MaxArea = resolution.W * resolution.H;
        Step = step;
        Enabled = enabled;
        NoUpscale = noUpscale;
        _resos = enabled ? MakeBucketResolutions(resolution, minReso, maxReso, step) : [resolution];
    }

    /// <summary>kohya model_util.make_bucket_resolutions.</summary>
    public static List<(int W, int H)> MakeBucketResolutions((int W, int H) maxReso, int minSize = 256, int maxSize = 1024, int divisible = 64)
    {
        long maxArea = (long)maxReso.W * maxReso.H;
        var set = new HashSet<(int, int)>();
        int sq = (int)(Math.Floor(Math.Sqrt(maxArea) / divisible) * divisible);
        set.Add((sq, sq));
        for (int w = minSize; w <= maxSize; w += divisible)
        {
            int h = (int)Math.Min(maxSize, maxArea / w / divisible * divisible);
            if (h >= minSize)
            {
                set.Add((w, h));
                set.Add((h, w));
            }
        }
        return set.OrderBy(r => r.Item1).ThenBy(r => r.Item2).ToList();
    }

    /// <summary>The bucket, resize and center crop of an image of the given size.</summary>
    public BucketPlacement Place(int width, int height)
    {
        (int W, int H) bucket;
        if (Enabled && NoUpscale)
        {
            double scale = Math.Min(1.0, Math.Sqrt((double)MaxArea / ((double)width * height)));
            int bw = Math.Max(Step, (int)(width * scale) / Step * Step);
            int bh = Math.Max(Step, (int)(height * scale) / Step * Step);
            bucket = (bw, bh);
        }
        else
        {
            double ar = (double)width / height;
            bucket = _resos[0];
            double best = double.MaxValue;
            foreach (var r in _resos)
            {
                double err = Math.Abs((double)r.W / r.H - ar);
                if (err < best) { best = err; bucket = r; }
            }
        }
        // Scale so the image covers the bucket (kohya: fit the side whose ratio is tighter), round half up.
        double arBucket = (double)bucket.W / bucket.H;
        double arImage = (double)width / height;
        double s = arImage > arBucket ? (double)bucket.H / height : (double)bucket.W / width;
        int rw = Math.Max(bucket.W, (int)(width * s + 0.5));
        int rh = Math.Max(bucket.H, (int)(height * s + 0.5));
        return new BucketPlacement(bucket.W, bucket.H, rw, rh, (rw - bucket.W) / 2, (rh - bucket.H) / 2);
    }
}
