using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>What <see cref="StarDetector"/> measured on one image (for the chosen figure: the star if one was found, else the largest plausible figure).</summary>
/// <param name="IsStar">One of the colour regions is a figure with a five-lobed outline whose solidity is below the threshold.</param>
/// <param name="HasShape">At least one colour region is a figure of plausible size that stays clear of the image border.</param>
/// <param name="Solidity">Area of the figure / area of its convex hull (1 for convex shapes; ≈ 0.52 for the demo's star when drawn exactly).</param>
/// <param name="AreaFraction">The figure's share of the image.</param>
/// <param name="Lobes">The dominant harmonic (2..8) of the outline's radius around the centroid (5 for a five-pointed star).</param>
/// <param name="LobeStrength">Its amplitude relative to the mean radius.</param>
public sealed record StarReading(bool IsStar, bool HasShape, double Solidity, double AreaFraction, int Lobes = 0, double LobeStrength = 0);

/// <summary>
/// A pixel statistic for the demo's held-out concept: is there a star-shaped figure in the image?
/// <list type="number">
/// <item>The pixels' colours are split into <see cref="Clusters"/> groups by k-means (deterministic farthest-point
/// start), so a figure is found whatever its colour and however blotchy the background around it.</item>
/// <item>Each group's mask is opened with a 3×3 square (images ≥ 48 px; this cuts the thin bridges that join a figure
/// to background blotches of a similar colour); its largest 4-connected region, holes filled, is a candidate figure.</item>
/// <item>A candidate is plausible when it covers <see cref="MinArea"/>–<see cref="MaxArea"/> of the image and at most
/// <see cref="MaxBorderShare"/> of the 2-pixel border ring (a figure, not the background).</item>
/// <item>It is a star when its solidity (area / convex hull area) is below <see cref="SolidityThreshold"/> and its
/// outline has five lobes: the 5th harmonic of its radius around the centroid is the strongest of harmonics 2..8,
/// with amplitude ≥ <see cref="MinLobeStrength"/> of the mean radius.</item>
/// </list>
/// Circles, squares and triangles have solidity ≈ 0.9–1 and 0, 4 or 3 lobes; a drawn five-pointed star ≈ 0.5 and
/// 5 lobes; a generated star, softened by the decoder and by the opening, ≈ 0.7–0.84.
/// </summary>
public static class StarDetector
{
    public const int Clusters = 3;
    public const double SolidityThreshold = 0.85;
    public const double MinArea = 0.03, MaxArea = 0.5, MaxBorderShare = 0.02, MinLobeStrength = 0.12;
    /// <summary>Images at least this wide and high are opened before regions are taken (smaller ones would lose the star's arms).</summary>
    public const int MinSizeForOpening = 48;

    /// <summary>Reads an image tensor [3, H, W] in [−1, 1] (any device, float).</summary>
    public static StarReading Read(Tensor image)
    {
        if (image.dim() == 4 && image.shape[0] == 1) image = image[0];
        if (image.dim() != 3 || image.shape[0] != 3) throw new ArgumentException($"expected [3, H, W], got [{string.Join(", ", image.shape)}]", nameof(image));
        int h = (int)image.shape[1], w = (int)image.shape[2];
        float[] px;
        using (var scope = NewDisposeScope())
        {
            // The pixels are read on the host: the one transfer off the compute device.
            var x = ((image.detach().to_type(ScalarType.Float32).clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).contiguous().to(DeviceType.CPU);
            px = x.data<float>().ToArray();
        }
        return Read(px, w, h);
    }

    /// <summary>Reads RGB values [H, W, 3] in 0..255.</summary>
    public static StarReading Read(float[] rgb, int w, int h)
    {
        if (rgb.Length != w * h * 3) throw new ArgumentException($"expected {w}×{h}×3 = {w * h * 3} values, got {rgb.Length}", nameof(rgb));
        int n = w * h;
        var labels = KMeans(rgb, n, Clusters);
        int borderPixels = Enumerable.Range(0, n).Count(i => OnBorder(i, w, h));
        StarReading? star = null, largest = null, any = null;
        for (int k = 0; k < Clusters; k++)
        {
            var mask = new bool[n];
            for (int i = 0; i < n; i++) mask[i] = labels[i] == k;
            if (w >= MinSizeForOpening && h >= MinSizeForOpening) mask = Open(mask, w, h);
            var region = LargestComponent(mask, w, h);
            if (region.Count == 0) continue;
            region = FillHoles(region, w, h);
            double area = (double)region.Count / n;
            double borderShare = (double)region.Count(i => OnBorder(i, w, h)) / borderPixels;
            bool plausible = area >= MinArea && area <= MaxArea && borderShare <= MaxBorderShare;
            double hull = HullArea(region.Select(i => (i % w, i / w)));
            double solidity = hull <= 0 ? 1 : Math.Min(1, region.Count / hull);
            var (lobes, strength) = Lobes(region, w);
            bool isStar = plausible && solidity < SolidityThreshold && lobes == 5 && strength >= MinLobeStrength;
            var reading = new StarReading(isStar, plausible, solidity, area, lobes, strength);
            if (isStar && (star is null || strength > star.LobeStrength)) star = reading;
            if (plausible && (largest is null || area > largest.AreaFraction)) largest = reading;
            if (any is null || area > any.AreaFraction) any = reading;
        }
        return star ?? largest ?? (any is null ? new StarReading(false, false, 0, 0) : any with { IsStar = false, HasShape = false });
    }

    static bool OnBorder(int i, int w, int h)
    {
        int x = i % w, y = i / w;
        return x < 2 || y < 2 || x >= w - 2 || y >= h - 2;
    }

    /// <summary>
    /// k-means of the pixel colours: starts from the pixel farthest from the mean colour, then repeatedly the pixel
    /// farthest from every chosen centre (deterministic, no random start); 20 Lloyd iterations or until stable.
    /// Returns the cluster of each pixel.
    /// </summary>
    static int[] KMeans(float[] rgb, int n, int k)
    {
        double Dist(int i, double[] c)
        {
            double d0 = rgb[i * 3] - c[0], d1 = rgb[i * 3 + 1] - c[1], d2 = rgb[i * 3 + 2] - c[2];
            return d0 * d0 + d1 * d1 + d2 * d2;
        }
        double[] Colour(int i) => [rgb[i * 3], rgb[i * 3 + 1], rgb[i * 3 + 2]];
        var mean = new double[3];
        for (int i = 0; i < n; i++) for (int c = 0; c < 3; c++) mean[c] += rgb[i * 3 + c] / (double)n;
        var centres = new List<double[]> { Colour(Enumerable.Range(0, n).MaxBy(i => Dist(i, mean))) };
        while (centres.Count < k) centres.Add(Colour(Enumerable.Range(0, n).MaxBy(i => centres.Min(c => Dist(i, c)))));
        var labels = new int[n];
        for (int iteration = 0; iteration < 20; iteration++)
        {
            bool changed = iteration == 0;
            for (int i = 0; i < n; i++)
            {
                int best = 0;
                double bestDist = double.MaxValue;
                for (int c = 0; c < k; c++)
                {
                    double d = Dist(i, centres[c]);
                    if (d < bestDist) { bestDist = d; best = c; }
                }
                if (labels[i] != best) { labels[i] = best; changed = true; }
            }
            if (!changed) break;
            for (int c = 0; c < k; c++)
            {
                var sum = new double[3];
                int count = 0;
                for (int i = 0; i < n; i++)
                {
                    if (labels[i] != c) continue;
                    count++;
                    for (int j = 0; j < 3; j++) sum[j] += rgb[i * 3 + j];
                }
                if (count > 0) centres[c] = [sum[0] / count, sum[1] / count, sum[2] / count];
            }
        }
        return labels;
    }

    /// <summary>Morphological opening with a 3×3 square (erosion treats outside pixels as the nearest edge pixel).</summary>
    static bool[] Open(bool[] mask, int w, int h)
    {
        var eroded = new bool[mask.Length];
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
            {
                bool all = true;
                for (int dy = -1; dy <= 1 && all; dy++)
                    for (int dx = -1; dx <= 1 && all; dx++)
                        all = mask[Math.Clamp(y + dy, 0, h - 1) * w + Math.Clamp(x + dx, 0, w - 1)];
                eroded[y * w + x] = all;
            }
        var opened = new bool[mask.Length];
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
            {
                bool any = false;
                for (int dy = -1; dy <= 1 && !any; dy++)
                    for (int dx = -1; dx <= 1 && !any; dx++)
                    {
                        int xx = x + dx, yy = y + dy;
                        any = xx >= 0 && yy >= 0 && xx < w && yy < h && eroded[yy * w + xx];
                    }
                opened[y * w + x] = any;
            }
        return opened;
    }

    /// <summary>The region plus every pixel not reachable from the image edge without crossing it.</summary>
    static List<int> FillHoles(List<int> region, int w, int h)
    {
        var inside = new bool[w * h];
        foreach (var i in region) inside[i] = true;
        var outside = new bool[w * h];
        var stack = new Stack<int>();
        for (int i = 0; i < w * h; i++)
        {
            int x = i % w, y = i / w;
            if ((x == 0 || y == 0 || x == w - 1 || y == h - 1) && !inside[i]) { outside[i] = true; stack.Push(i); }
        }
        while (stack.Count > 0)
        {
            int i = stack.Pop();
            foreach (var j in Neighbours(i, w, h))
                if (!inside[j] && !outside[j]) { outside[j] = true; stack.Push(j); }
        }
        return Enumerable.Range(0, w * h).Where(i => !outside[i]).ToList();
    }

    static IEnumerable<int> Neighbours(int i, int w, int h)
    {
        int x = i % w, y = i / w;
        if (x > 0) yield return i - 1;
        if (x < w - 1) yield return i + 1;
        if (y > 0) yield return i - w;
        if (y < h - 1) yield return i + w;
    }

    /// <summary>
    /// The outline's dominant symmetry: r(θ) = the farthest component pixel from the centroid in each of 36 angle bins
    /// (empty bins interpolated); returns the harmonic k ∈ 2..8 of r(θ) with the largest amplitude and that amplitude
    /// relative to the mean radius (a five-pointed star: k = 5, ≈ 0.3 when sharp; a triangle k = 3; a square k = 4).
    /// </summary>
    static (int Lobes, double Strength) Lobes(List<int> component, int w)
    {
        const int bins = 36;
        double cx = component.Average(i => i % w), cy = component.Average(i => i / w);
        var r = new double[bins];
        var has = new bool[bins];
        foreach (var i in component)
        {
            double dx = i % w - cx, dy = i / w - cy;
            double a = Math.Atan2(dy, dx);
            int b = (int)Math.Floor((a + Math.PI) / (2 * Math.PI) * bins) % bins;
            double d = Math.Sqrt(dx * dx + dy * dy) + 0.5;
            if (!has[b] || d > r[b]) { r[b] = d; has[b] = true; }
        }
        if (!has.Any(x => x)) return (0, 0);
        for (int b = 0; b < bins; b++)
        {
            if (has[b]) continue;
            int lo = 1, hi = 1;
            while (!has[(b - lo + bins) % bins]) lo++;
            while (!has[(b + hi) % bins]) hi++;
            r[b] = (r[(b - lo + bins) % bins] * hi + r[(b + hi) % bins] * lo) / (lo + hi);
        }
        double mean = r.Average();
        int best = 0;
        double bestAmp = 0;
        for (int k = 2; k <= 8; k++)
        {
            double re = 0, im = 0;
            for (int b = 0; b < bins; b++)
            {
                double t = 2 * Math.PI * k * b / bins;
                re += r[b] * Math.Cos(t);
                im -= r[b] * Math.Sin(t);
            }
            double amp = 2 * Math.Sqrt(re * re + im * im) / bins / mean;
            if (amp > bestAmp) { bestAmp = amp; best = k; }
        }
        return (best, bestAmp);
    }

    static List<int> LargestComponent(bool[] mask, int w, int h)
    {
        var seen = new bool[mask.Length];
        var best = new List<int>();
        var stack = new Stack<int>();
        for (int s = 0; s < mask.Length; s++)
        {
            if (!mask[s] || seen[s]) continue;
            var comp = new List<int>();
            stack.Push(s);
            seen[s] = true;
            while (stack.Count > 0)
            {
                int i = stack.Pop();
                comp.Add(i);
                foreach (var j in Neighbours(i, w, h))
                    if (mask[j] && !seen[j]) { seen[j] = true; stack.Push(j); }
            }
            if (comp.Count > best.Count) best = comp;
        }
        return best;
    }

    /// <summary>Area of the convex hull of the pixels' unit squares (monotone chain over their corners).</summary>
    static double HullArea(IEnumerable<(int X, int Y)> pixels)
    {
        var pts = new HashSet<(long, long)>();
        foreach (var (x, y) in pixels)
        {
            pts.Add((x, y)); pts.Add((x + 1, y)); pts.Add((x, y + 1)); pts.Add((x + 1, y + 1));
        }
        var p = pts.OrderBy(t => t.Item1).ThenBy(t => t.Item2).ToArray();
        if (p.Length < 3) return 0;
        static long Cross((long X, long Y) o, (long X, long Y) a, (long X, long Y) b) => (a.X - o.X) * (b.Y - o.Y) - (a.Y - o.Y) * (b.X - o.X);
        var hull = new (long X, long Y)[2 * p.Length];
        int k = 0;
        for (int i = 0; i < p.Length; i++)
        {
            while (k >= 2 && Cross(hull[k - 2], hull[k - 1], p[i]) <= 0) k--;
            hull[k++] = p[i];
        }
        for (int i = p.Length - 2, t = k + 1; i >= 0; i--)
        {
            while (k >= t && Cross(hull[k - 2], hull[k - 1], p[i]) <= 0) k--;
            hull[k++] = p[i];
        }
        double area = 0;
        for (int i = 0; i < k - 1; i++) area += hull[i].X * hull[i + 1].Y - hull[i + 1].X * hull[i].Y;
        return Math.Abs(area) / 2;
    }

    /// <summary>The fraction of images [N, 3, H, W] that are stars.</summary>
    public static double StarRate(IEnumerable<Tensor> images) => images.Select(Read).Select(r => r.IsStar ? 1.0 : 0.0).DefaultIfEmpty(0).Average();
}
