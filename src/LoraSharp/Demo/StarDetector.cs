using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Demo;

/// <summary>What <see cref="StarDetector"/> measured on one image.</summary>
/// <param name="IsStar">A single dominant shape whose solidity is below the threshold.</param>
/// <param name="HasShape">A single dominant foreground shape of plausible size was found.</param>
/// <param name="Solidity">Area of the largest foreground component / area of its convex hull (1 for convex shapes; ≈ 0.52 for the demo's star).</param>
/// <param name="AreaFraction">The component's share of the image.</param>
/// <param name="Dominance">The component's share of all foreground pixels.</param>
/// <param name="Lobes">The dominant harmonic (2..8) of the outline's radius around the centroid (5 for a five-pointed star).</param>
/// <param name="LobeStrength">Its amplitude relative to the mean radius.</param>
public sealed record StarReading(bool IsStar, bool HasShape, double Solidity, double AreaFraction, double Dominance, int Lobes = 0, double LobeStrength = 0);

/// <summary>
/// A pixel statistic for the demo's held-out concept: is there one star-shaped figure in the image? The background
/// colour is the median of the border pixels; foreground = pixels farther than <see cref="ColourDistance"/> from it;
/// the largest 4-connected foreground component must be 3–60 % of the image and hold ≥ 70 % of the foreground, and
/// ≥ 75 % of the border must be background (a clean scene, not texture). It is a star when its solidity (area / convex
/// hull area) is below <see cref="SolidityThreshold"/> and its outline has five lobes: the 5th harmonic of its radius
/// around the centroid is the strongest of harmonics 2..8, with amplitude ≥ 8 % of the mean radius. Circles, squares
/// and triangles have solidity ≈ 0.95–1 (and 0, 4, 3 lobes); the five-pointed star ≈ 0.5 when drawn exactly (blurry
/// stars score higher, so the threshold sits between).
/// </summary>
public static class StarDetector
{
    public const double ColourDistance = 60;
    public const double SolidityThreshold = 0.8;
    public const double MinArea = 0.03, MaxArea = 0.6, MinDominance = 0.7, MinCleanBorder = 0.75, MinLobeStrength = 0.08;

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
        // Background: per-channel median of a 2-pixel border.
        var border = new List<int>();
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                if (x < 2 || y < 2 || x >= w - 2 || y >= h - 2) border.Add(y * w + x);
        var bg = new double[3];
        for (int c = 0; c < 3; c++)
        {
            var v = border.Select(i => rgb[i * 3 + c]).OrderBy(f => f).ToArray();
            bg[c] = v[v.Length / 2];
        }
        var fg = new bool[w * h];
        int fgCount = 0;
        for (int i = 0; i < w * h; i++)
        {
            double d0 = rgb[i * 3] - bg[0], d1 = rgb[i * 3 + 1] - bg[1], d2 = rgb[i * 3 + 2] - bg[2];
            if (Math.Sqrt(d0 * d0 + d1 * d1 + d2 * d2) > ColourDistance) { fg[i] = true; fgCount++; }
        }
        var component = LargestComponent(fg, w, h);
        if (component.Count == 0) return new StarReading(false, false, 0, 0, 0);
        double area = component.Count;
        double hull = HullArea(component.Select(i => (i % w, i / w)));
        double solidity = hull <= 0 ? 1 : Math.Min(1, area / hull);
        double areaFraction = area / (w * h), dominance = area / fgCount;
        double borderClean = border.Count(i => !fg[i]) / (double)border.Count;
        bool hasShape = areaFraction >= MinArea && areaFraction <= MaxArea && dominance >= MinDominance && borderClean >= MinCleanBorder;
        var (lobes, lobeStrength) = Lobes(component, w);
        bool star = hasShape && solidity < SolidityThreshold && lobes == 5 && lobeStrength >= MinLobeStrength;
        return new StarReading(star, hasShape, solidity, areaFraction, dominance, lobes, lobeStrength);
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
                int x = i % w, y = i / w;
                void Visit(int j) { if (mask[j] && !seen[j]) { seen[j] = true; stack.Push(j); } }
                if (x > 0) Visit(i - 1);
                if (x < w - 1) Visit(i + 1);
                if (y > 0) Visit(i - w);
                if (y < h - 1) Visit(i + w);
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
